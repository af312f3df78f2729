"""Structured outputs: constraints compiled to llguidance grammars, and per-row token masks.

Letters: R decode rows, V vocab, M = ceil(V / 32) mask words (bit v % 32 of word v // 32 set = token
v allowed, llguidance's layout).

Why llguidance: it works from any HF tokenizer.json (no per-model tables), computes a row's mask in
tens of microseconds on the host, and fills numpy bitmasks directly, so the decoder only has to
apply an [R,M] int32 argument (`phi_jax.inference.decode`). The decoder and the server share this
module: a request's `response_format` / vLLM's `structured_outputs` become a `Constraint` here, and
each sequence gets its own `RowMatcher` (the grammar's state as tokens are chosen).

JSON is compact (no free whitespace between tokens): a weak model otherwise loops on newlines and
spaces where a grammar allows them, as vLLM's backends found; a schema still allows any string.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping, Sequence

import numpy as np

from phi_jax.errors import InputError

# Compact JSON: "," and ":" with no whitespace (a weak model loops on free whitespace).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
STRUCTURED_KINDS = ("choice", "regex", "json", "grammar")


class ConstraintError(InputError):
    """A constraint that cannot be used; `field` names the request field (the server answers 400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def mask_words(vocab_size: int) -> int:
    """M: int32 words of one row's token bitmask."""
    return (vocab_size + 31) // 32


def all_allowed(rows: int, vocab_size: int) -> np.ndarray:
    """[R,M] int32 masks that allow every token (the mask of an unconstrained row)."""
    return np.full((rows, mask_words(vocab_size)), -1, np.int32)


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer_json: str, vocab_size: int, eos_id: int):
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_id)


def grammar_tokenizer(tokenizer, vocab_size: int):
    """The llguidance tokenizer of a `phi_jax.Tokenizer`, built once per (tokenizer.json, vocab, eos).

    `vocab_size` is the model's (it may be padded past the tokenizer's: those ids are never
    allowed). The grammar ends a sequence with the tokenizer's eos, the decoder's stop token.
    """
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise InputError("structured outputs need a tokenizer.json (HF tokenizers) tokenizer; this "
                         f"model's is {type(tokenizer).__name__}: convert it with transformers")
    if tokenizer.eos_id is None:
        raise InputError("structured outputs need an end-of-sequence token to finish a constrained "
                         "answer; this tokenizer has none: set eos_token in tokenizer_config.json")
    return _ll_tokenizer(backend.to_str(), int(vocab_size), int(tokenizer.eos_id))


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A compiled constraint: an llguidance grammar bound to one tokenizer. `new_matcher()` gives
    each sequence its own state; `kind` and `source` say what was asked for (for messages)."""

    kind: str
    grammar: str
    ll_tokenizer: Any = dataclasses.field(repr=False, compare=False)

    def new_matcher(self) -> "RowMatcher":
        import llguidance

        return RowMatcher(llguidance.LLMatcher(self.ll_tokenizer, self.grammar, log_level=0))


class RowMatcher:
    """One sequence's grammar state: fill its next-token mask, then advance by the chosen token."""

    def __init__(self, matcher):
        self._matcher = matcher

    def fill(self, masks: np.ndarray, row: int) -> None:
        """Write the allowed-token bitmask of the next token into masks[row] ([R,M] int32)."""
        import llguidance.numpy

        llguidance.numpy.fill_next_token_bitmask(self._matcher, masks, row)

    def consume(self, token: int) -> bool:
        """Advance by `token`; False when the grammar rejects it (then the row must end)."""
        if self._matcher.is_stopped():  # only the eos that the finished grammar allowed
            return True
        return bool(self._matcher.consume_token(int(token)))

    @property
    def error(self) -> str:
        return self._matcher.get_error()


def fill_masks(matchers: Sequence[RowMatcher | None], vocab_size: int) -> np.ndarray:
    """[R,M] masks: a row with a matcher gets its grammar's, the others allow every token.

    Rows are filled in parallel across cores (llguidance's executor) when there are several."""
    import llguidance
    import llguidance.numpy

    masks = all_allowed(len(matchers), vocab_size)
    rows = [(m._matcher, r) for r, m in enumerate(matchers) if m is not None]
    if len(rows) == 1:
        matchers[rows[0][1]].fill(masks, rows[0][1])
    elif rows:
        llguidance.numpy.fill_next_token_bitmask_par(_executor(), rows, masks)
    return masks


@functools.lru_cache(maxsize=1)
def _executor():
    import llguidance

    return llguidance.LLExecutor()


def allowed_tokens(masks: np.ndarray, vocab_size: int) -> np.ndarray:
    """[R,M] int32 bitmasks -> [R,V] bool (a host-side reference of what the decoder applies)."""
    bits = np.unpackbits(np.ascontiguousarray(masks).view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)


# ------------------------------------------------------------------------------ request -> grammar
def _schema_grammar(schema: Any, field: str) -> str:
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(field, f"is not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(field, f"must be a JSON schema object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except ValueError as e:
        raise ConstraintError(field, f"is not a usable JSON schema ({e})") from None


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def grammar_of(response_format: Mapping[str, Any] | None = None,
               structured_outputs: Mapping[str, Any] | None = None) -> tuple[str, str, str] | None:
    """(kind, llguidance grammar, field) of a request's constraint, or None when it has none.

    Accepts OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema",
    "json_schema": {"name", "schema", "strict"}}) and vLLM's `structured_outputs` (exactly one of
    {"choice": [str, ...]}, {"regex": str}, {"json": schema}, {"grammar": lark}). Raises
    ConstraintError naming the field and the reason.
    """
    import llguidance

    if response_format is not None and structured_outputs is not None:
        raise ConstraintError("structured_outputs", "give either response_format or structured_outputs, "
                                                    "not both")
    if response_format is not None:
        field = "response_format"
        if not isinstance(response_format, Mapping):
            raise ConstraintError(field, 'must be an object such as {"type": "json_object"}')
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return "json_object", _schema_grammar({"type": "object"}, field), field
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping) or "schema" not in spec:
                raise ConstraintError(f"{field}.json_schema", 'must be {"name": ..., "schema": {...}}')
            return "json_schema", _schema_grammar(spec["schema"], f"{field}.json_schema.schema"), field
        raise ConstraintError(f"{field}.type", f"{kind!r} is not supported; use text, json_object or "
                                               "json_schema")
    if structured_outputs is None:
        return None
    field = "structured_outputs"
    if not isinstance(structured_outputs, Mapping):
        raise ConstraintError(field, 'must be an object such as {"choice": ["yes", "no"]}')
    given = [k for k in STRUCTURED_KINDS if structured_outputs.get(k) is not None]
    if len(given) != 1:
        raise ConstraintError(field, f"give exactly one of {', '.join(STRUCTURED_KINDS)}; got "
                                     f"{', '.join(given) or 'none'}")
    kind = given[0]
    value = structured_outputs[kind]
    where = f"{field}.{kind}"
    if kind == "json":
        return "json", _schema_grammar(value, where), where
    if kind == "choice":
        if (not isinstance(value, list) or not value
                or not all(isinstance(c, str) and c for c in value)):
            raise ConstraintError(where, "must be a non-empty list of non-empty strings")
        lark = "start: " + " | ".join(_lark_string(c) for c in value)
        return "choice", llguidance.LLMatcher.grammar_from_lark(lark), where
    if not isinstance(value, str) or not value:
        raise ConstraintError(where, "must be a non-empty string")
    if kind == "regex":
        return "regex", llguidance.LLMatcher.grammar_from_regex(value), where
    return "grammar", llguidance.LLMatcher.grammar_from_lark(value), where


def compile_constraint(tokenizer, vocab_size: int, response_format: Mapping[str, Any] | None = None,
                       structured_outputs: Mapping[str, Any] | None = None) -> Constraint | None:
    """A request's constraint checked against the model's tokenizer, or None (no constraint).

    Raises ConstraintError (the server's 400) naming the field and llguidance's reason: an
    unsupported schema feature, an invalid regex or lark grammar.
    """
    import llguidance

    found = grammar_of(response_format, structured_outputs)
    if found is None:
        return None
    kind, grammar, field = found
    ll_tokenizer = grammar_tokenizer(tokenizer, vocab_size)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
    if is_error:
        reason = " ".join(" ".join(messages).split())[:300]
        raise ConstraintError(field, f"cannot be used: {reason}")
    return Constraint(kind, grammar, ll_tokenizer)
