"""Chat messages -> one prompt string, rendered exactly as transformers' `apply_chat_template` does.

Chat templates are Jinja code from model repositories (tokenizer_config.json's `chat_template`,
or a GGUF's `tokenizer.chat_template`), so they run in jinja2's immutable sandbox, in the
environment transformers builds: `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension,
a `{% generation %}` block (rendered as its body), a `tojson` filter that does not escape HTML
(`json.dumps`, ensure_ascii=False), and the globals `raise_exception`, `strftime_now`, `dict` and
`namespace`. Templates see the same variables: `messages`, `tools`, `documents`,
`add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, and any other given as a
keyword) and any extra keyword. So a prompt rendered here tokenizes to transformers' ids.

Models without a template get `DEFAULT_CHAT_TEMPLATE`, ChatML (the format SmolLM2, Qwen2 and many
fine-tunes use):

    <|im_start|>system
    You are terse.<|im_end|>
    <|im_start|>user
    What is 2 + 2?<|im_end|>
    <|im_start|>assistant

For a base model (phi-1/2) that never saw these markers they are plain text; pass a template of
your own (`phi-jax serve --chat-template`) when a model card prescribes another format.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Mapping, Sequence

from phi_jax.errors import InputError, one_line

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(InputError):
    """The template could not render these messages (the HTTP layer answers 400)."""


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template refused these messages: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
        transformers; for rendering it is just its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class _Namespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore attributes (no reaching into internals)."""

        def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_Namespace)
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Messages as plain JSON-like data: templates never see caller objects (or their methods)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def render_chat(messages: Sequence[Mapping[str, Any]], template: str | None = None, *,
                bos_token: str, eos_token: str, add_generation_prompt: bool = True,
                **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

    Args:
      messages: the conversation, oldest first.
      template: a Jinja chat template; None = `DEFAULT_CHAT_TEMPLATE` (ChatML).
      bos_token, eos_token: the tokenizer's special token strings ("" when it has none).
      add_generation_prompt: end with the assistant turn's opening, as for generation.
      **extra: more template variables (unk_token, pad_token, tools, documents, a date, ...).
    Raises:
      ChatTemplateError: the template failed or refused the messages (one line, the reason).
    """
    import jinja2

    variables = {"tools": None, "documents": None, **_plain(extra)}
    try:
        return _compile(template or DEFAULT_CHAT_TEMPLATE).render(
            messages=_plain(list(messages)), add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {one_line(e)}; fix the "
                                "template or the messages") from None
