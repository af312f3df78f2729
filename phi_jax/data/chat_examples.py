"""A chat conversation -> (token ids, loss mask) for fine-tuning: the loss on the assistant's
tokens only.

The conversation is rendered whole with the model's chat template (`phi_jax.chat.render_chat`,
ChatML when the model has none), exactly as inference renders it. Each assistant answer is then
found in that text: the template's rendering of the turns before it, with the generation prompt,
is a prefix of the whole, and the answer starts where that prefix ends. The answer's span is
extended over the end-of-turn marker the template writes right after it (`<|im_end|>`, `<|end|>`,
`<|eot_id|>`, `</s>`, `<|endoftext|>` or the tokenizer's EOS), so the model learns to stop. The text
is tokenized once, with character offsets, and a token is a loss token when it starts inside an
answer's span. Nothing is appended: the template's own markers end the document.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from phi_jax.chat import render_chat
from phi_jax.errors import InputError

END_OF_TURN = ("<|im_end|>", "<|end|>", "<|eot_id|>", "</s>", "<|endoftext|>")


def assistant_spans(messages: Sequence[Mapping[str, str]], template: str | None,
                    special: Mapping[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) character span of each answer + its end marker])."""
    text = render_chat(messages, template, add_generation_prompt=False, **special)
    markers = sorted({m for m in (*END_OF_TURN, special.get("eos_token") or "") if m}, key=len,
                     reverse=True)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_chat(messages[:i], template, add_generation_prompt=True, **special)
        start = len(prefix) if text.startswith(prefix) else cursor
        content = message["content"]
        found = text.find(content, start) if content else -1
        if found < 0 and content.strip():
            content = content.strip()
            found = text.find(content, start)
        if found < 0 or text[start:found].strip():
            raise InputError(f"the chat template does not write assistant turn {i} verbatim after its "
                             "prompt, so its tokens cannot be found for the loss mask; use a template "
                             "that renders message content as it is (--config.data.chat_template=FILE)")
        end = found + len(content)
        for marker in markers:
            if text.startswith(marker, end):
                end += len(marker)
                break
        spans.append((found, end))
        cursor = end
    return text, spans


def chat_tokens(tokenizer, messages: Sequence[Mapping[str, str]], template: str | None
                ) -> tuple[list[int], list[int]]:
    """(token ids, mask): mask[t] = 1 exactly on the tokens of assistant answers (and their
    end-of-turn marker), 0 on the system and user turns and the template's own markup."""
    text, spans = assistant_spans(messages, template, tokenizer.special_tokens_map)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in offsets]
    return ids, mask


def conversation_of(obj: Mapping[str, Any], field: str) -> Any:
    """The conversation of a record: `obj[field]`, or `obj["meta"][field]` (the record schema of
    `phi-jax data instruct`), or None."""
    if field in obj:
        return obj[field]
    meta = obj.get("meta")
    return meta.get(field) if isinstance(meta, Mapping) else None


def check_conversation(messages: Any) -> str | None:
    """None for a usable conversation, else why not (roles alternate user/assistant after an
    optional system turn, contents are strings, and there is an assistant turn to learn from)."""
    if not isinstance(messages, list) or not messages:
        return "the conversation is not a non-empty list of messages"
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
    if not all(isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in messages):
        return "every message needs a string 'content'"
    body = roles[1:] if roles[0] == "system" else roles
    if not body or any(r != ("user" if k % 2 == 0 else "assistant") for k, r in enumerate(body)):
        return f"roles {roles} are not an optional system turn, then user/assistant turns"
    if "assistant" not in body:
        return "it has no assistant turn to train on"
    return None
