"""Raw record -> tokenized document, with the one bad-data policy; runs inside Grain workers.

A document becomes `{"tokens": int32[n], "token_mask": int32[n], "skip": str, "origin": str}`
with EOS appended (so packed documents are separated by EOS). `token_mask[i] = 1` means "token i
is a training target": 0 on the prompt of an instruction record (and on a pre-tokenized record's
masked tokens), 1 everywhere else.

Bad records (invalid UTF-8, a line that is not JSON or lacks the field, an empty document) either
raise `BadDataError` naming the record's origin (`bad_data="error"`, the default) or come back as a
skip marker (`skip` = the reason, no tokens) that the main process counts in `DataStats`. Skips are
counted in the main process, not here, because Grain workers are separate processes.

Record shapes understood (JSON objects: JSONL lines, ArrayRecord JSON records, tfds features):
  {text_field: "..."}                                   plain text
  {prompt_field: "...", completion_field: "..."}        instruction pair; loss on the completion
  {tokens_field: [ids...], mask_field: [0/1...]}        pre-tokenized, with an optional mask
  {messages_field: [{"role", "content"}, ...]}          a chat conversation (also under "meta",
                                                        as `phi-jax data instruct` writes it); read
                                                        only when messages_field is set; rendered
                                                        with the chat template, loss on the
                                                        assistant's tokens (`chat_examples`), no EOS
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from phi_jax.errors import InputError

SKIP_REASONS = ("bad_utf8", "bad_json", "missing_field", "empty", "too_long")


class BadDataError(InputError):
    """A record the pipeline cannot use; the message names the record and how to skip such records."""


@dataclasses.dataclass
class DataStats:
    """Counters of one pipeline iterator; part of its checkpointed state, so they survive restores.

    Documents are counted as they enter packing, so after `set_state` the counters are those of
    the restored position (the packer re-reads the documents of its unfinished rows).

    Attributes:
      documents: documents that reached packing (a split document counts once).
      tokens: tokens of those documents, EOS included.
      split_documents: documents longer than seq_len that were cut into chunks.
      long_documents: documents longer than data.max_document_chars, tokenized piece by piece
        (so one huge record never stalls the pipeline or holds all its tokens in memory).
      bad_utf8, bad_json, missing_field, empty, too_long: skipped records by reason.
      empty_files: input files with no record at all (found when the dataset is built).
    """

    documents: int = 0
    tokens: int = 0
    split_documents: int = 0
    long_documents: int = 0
    bad_utf8: int = 0
    bad_json: int = 0
    missing_field: int = 0
    empty: int = 0
    too_long: int = 0
    empty_files: int = 0

    @property
    def skipped(self) -> int:
        return sum(getattr(self, reason) for reason in SKIP_REASONS)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def load(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            setattr(self, key, int(value))


class _Skip(dict):
    """A skip marker: a document dict without tokens, typed so it is never mistaken for data."""


def skip_or_raise(reason: str, origin: str, detail: str, bad_data: str) -> _Skip:
    """The bad-data policy in one place: a skip marker, or an error naming the record and the fix."""
    if bad_data == "error":
        raise BadDataError(f"{origin}: {detail}. Fix the record, or set data.bad_data='skip' to skip "
                           f"and count such records ({reason})")
    return _Skip(tokens=np.zeros(0, np.int32), token_mask=np.zeros(0, np.int32), skip=reason,
                 origin=origin)


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """How to read a record's payload; built once from the data config.

    Attributes:
      payload: "text" (bytes/str are the document), "json" (bytes are a JSON object),
        "auto" (a JSON object if the bytes parse as one that has a known field, else text),
        "features" (already a dict, e.g. tfds).
    """

    payload: str
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    tokens_field: str = "tokens"
    mask_field: str = "loss_mask"
    messages_field: str = ""  # "" = conversations are not read


class DocumentTokenizer:
    """Picklable `record -> document` map for `grain.MapDataset.map`.

    Args:
      tokenizer: a `phi_jax.tokenizer.Tokenizer` with an EOS token.
      fmt: the record format.
      bad_data: "error" or "skip".
      add_bos: prepend BOS to every document (Phi does not).
      max_chars: a plain-text document longer than this (0 = no limit) is not tokenized here;
        it goes on as {"long_text": text} and the packer tokenizes it piece by piece, or, when
        long_documents is "skip" / "error", it is skipped and counted as too_long / an error.
      long_documents: the pipeline's long-document policy ("split", "skip" or "error").
    """

    def __init__(self, tokenizer, fmt: RecordFormat, bad_data: str = "error", add_bos: bool = False,
                 max_chars: int = 0, long_documents: str = "split", chat_template: str | None = None):
        if tokenizer.eos_id is None:
            raise InputError("the tokenizer has no EOS token, which the pipeline needs between packed "
                             "documents; set eos_token in tokenizer_config.json")
        if add_bos and tokenizer.bos_id is None:
            raise InputError("data.add_bos=True but the tokenizer has no BOS token; set bos_token in "
                             "tokenizer_config.json or data.add_bos=False")
        self._tok = tokenizer
        self._fmt = fmt
        self._bad_data = bad_data
        self._add_bos = add_bos
        self._max_chars = max_chars
        self._long_documents = long_documents
        self._chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        origin, data = record["origin"], record["data"]
        fields = self._fields(origin, data)
        if isinstance(fields, _Skip):
            return fields
        return self._tokenize(origin, fields)

    def _skip(self, reason: str, origin: str, detail: str) -> _Skip:
        return skip_or_raise(reason, origin, detail, self._bad_data)

    def _decode(self, origin: str, data: Any) -> Any:
        """bytes -> str (or a skip marker); anything else unchanged."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                return bytes(data).decode("utf-8")
            except UnicodeDecodeError as e:
                return self._skip("bad_utf8", origin, f"invalid UTF-8 at byte {e.start} ({e.reason})")
        return data

    def _fields(self, origin: str, data: Any) -> dict[str, Any] | _Skip:
        """Payload -> {"text": str} | {"prompt", "completion"} | {"tokens", "mask"} | skip marker."""
        fmt = self._fmt
        if fmt.payload == "features":
            obj = data
        else:
            text = self._decode(origin, data)
            if isinstance(text, _Skip):
                return text
            if fmt.payload == "text":
                return {"text": text}
            obj = None
            if fmt.payload == "json" or text.lstrip().startswith("{"):
                try:
                    obj = json.loads(text)
                except ValueError as e:
                    if fmt.payload == "json":
                        return self._skip("bad_json", origin, f"not valid JSON ({e})")
                if fmt.payload == "auto" and not (isinstance(obj, dict) and self._known_field(obj)):
                    obj = None  # Text that merely looks like JSON.
            if obj is None:
                return {"text": text}
            if not isinstance(obj, dict):
                return self._skip("bad_json", origin, f"expected a JSON object, got {type(obj).__name__}")
        if fmt.messages_field:
            from phi_jax.data.chat_examples import check_conversation, conversation_of

            messages = conversation_of(obj, fmt.messages_field)
            if messages is None:
                return self._skip("missing_field", origin, f"record has no {fmt.messages_field!r} "
                                  f"conversation (nor meta.{fmt.messages_field}); chat fine-tuning reads "
                                  "the output of `phi-jax data instruct`")
            problem = check_conversation(messages)
            if problem:
                return self._skip("bad_json", origin, f"its {fmt.messages_field!r}: {problem}")
            return {"messages": messages}
        if fmt.tokens_field in obj:
            try:
                tokens = np.asarray(obj[fmt.tokens_field], dtype=np.int64)
                mask = np.asarray(obj.get(fmt.mask_field, np.ones_like(tokens)), dtype=np.int64)
            except (TypeError, ValueError):
                tokens = mask = np.zeros((0, 0))  # Fails the shape check below.
            if tokens.ndim != 1 or mask.shape != tokens.shape:
                return self._skip("bad_json", origin, f"{fmt.tokens_field!r} must be a list of ids and "
                                  f"{fmt.mask_field!r} a list of the same length")
            if len(tokens) and (tokens.min() < 0 or tokens.max() >= self._tok.vocab_size):
                return self._skip("bad_json", origin, f"token ids outside [0, {self._tok.vocab_size})")
            return {"tokens": tokens, "mask": mask}
        if fmt.prompt_field in obj and fmt.completion_field in obj:
            return {"prompt": obj[fmt.prompt_field], "completion": obj[fmt.completion_field]}
        if fmt.text_field in obj:
            return {"text": obj[fmt.text_field]}
        return self._skip("missing_field", origin, f"record has no field {fmt.text_field!r} (fields: "
                          f"{sorted(obj)[:10]}); set data.jsonl_field to the text field's name")

    def _known_field(self, obj: dict[str, Any]) -> bool:
        fmt = self._fmt
        if fmt.messages_field:
            from phi_jax.data.chat_examples import conversation_of

            if conversation_of(obj, fmt.messages_field) is not None:
                return True
        return fmt.text_field in obj or fmt.tokens_field in obj or (
            fmt.prompt_field in obj and fmt.completion_field in obj)

    def _tokenize(self, origin: str, fields: dict[str, Any]) -> dict[str, Any]:
        bos = [self._tok.bos_id] if self._add_bos else []
        if "messages" in fields:
            return self._chat(origin, fields["messages"], bos)
        if "tokens" in fields:
            tokens, mask = fields["tokens"].tolist(), fields["mask"].tolist()
            tokens, mask = bos + tokens, [0] * len(bos) + mask
        else:
            for name, value in list(fields.items()):
                value = fields[name] = self._decode(origin, value)  # tfds text features are bytes.
                if isinstance(value, _Skip):
                    return value
                if not isinstance(value, str):
                    return self._skip("bad_json", origin, f"field {name!r} is {type(value).__name__}, "
                                      "expected a string")
            too_long = self._max_chars and sum(len(v) for v in fields.values()) > self._max_chars
            if too_long and not ("text" in fields and self._long_documents == "split"):
                if self._long_documents == "error":
                    raise BadDataError(f"{origin}: document of {sum(len(v) for v in fields.values())} "
                                       f"characters, more than data.max_document_chars="
                                       f"{self._max_chars}; set data.long_documents='split' to train "
                                       "on it in pieces or 'skip' to skip and count it")
                return _Skip(tokens=np.zeros(0, np.int32), token_mask=np.zeros(0, np.int32),
                             skip="too_long", origin=origin)
            if too_long:  # the packer tokenizes it piece by piece (see packing.py)
                return {"tokens": np.asarray(bos, np.int32), "token_mask": np.zeros(len(bos), np.int32),
                        "skip": "", "origin": origin, "long_text": fields["text"]}
            if "text" in fields:
                tokens = self._tok.encode(fields["text"]) if fields["text"] else []
                mask = [1] * len(tokens)
                tokens, mask = bos + tokens, [0] * len(bos) + mask
            else:
                prompt = bos + self._tok.encode(fields["prompt"])
                completion = self._tok.encode(fields["completion"])
                if not completion:
                    return self._skip("empty", origin, "instruction record has an empty completion")
                tokens, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
        if len(tokens) == len(bos):
            return self._skip("empty", origin, "empty document")
        tokens.append(self._tok.eos_id)
        mask.append(1)
        return {"tokens": np.asarray(tokens, np.int32), "token_mask": np.asarray(mask, np.int32),
                "skip": "", "origin": origin}

    def _chat(self, origin: str, messages: list, bos: list[int]) -> dict[str, Any]:
        from phi_jax.data.chat_examples import chat_tokens

        if self._max_chars and sum(len(m["content"]) for m in messages) > self._max_chars:
            if self._long_documents == "error":
                raise BadDataError(f"{origin}: conversation longer than data.max_document_chars="
                                   f"{self._max_chars}; raise it or set data.long_documents='skip'")
            return _Skip(tokens=np.zeros(0, np.int32), token_mask=np.zeros(0, np.int32),
                         skip="too_long", origin=origin)
        try:
            tokens, mask = chat_tokens(self._tok, messages, self._chat_template)
        except InputError as e:
            raise BadDataError(f"{origin}: {e}") from None
        if not any(mask):
            return self._skip("empty", origin, "conversation whose assistant turns are empty")
        return {"tokens": np.asarray(bos + tokens, np.int32),
                "token_mask": np.asarray([0] * len(bos) + mask, np.int32), "skip": "", "origin": origin}
