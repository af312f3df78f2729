"""Chat messages -> one prompt string, through the tokenizer's Jinja chat template or a default.

A checkpoint that ships `chat_template` in tokenizer_config.json (ChatML, Llama style, ...) is
rendered exactly as transformers' `apply_chat_template` does: a sandboxed Jinja environment with
`trim_blocks`/`lstrip_blocks`, the variables `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, and a `raise_exception` helper. The published Phi base models ship none; their model
cards prompt them as a dialogue of "Name: text" lines, so the default does the same:

    System: You are terse.
    User: What is 2 + 2?
    Assistant:
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template could not render these messages (the HTTP layer answers 400)."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(messages: Sequence[Mapping[str, str]], template: str | None = None, *,
                bos_token: str = "", eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]); template None = the default."""
    import jinja2

    try:
        return _compile(template or DEFAULT_CHAT_TEMPLATE).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
