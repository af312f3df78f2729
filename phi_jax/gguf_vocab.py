"""A phi_jax `Tokenizer` written into a GGUF file's `tokenizer.*` metadata, as llama.cpp's converter
writes it, so llama.cpp (and phi_jax's own reader, and transformers' GGUF loader) rebuild the same ids.

Two vocabulary kinds, by what the tokenizer is:
  * byte-level BPE (`tokenizer.ggml.model` = gpt2: GPT-2, Phi-1/2, SmolLM2, Llama 3, Qwen2, a
    phi_jax-trained tokenizer): every id's token string in its byte-level spelling, its type
    (normal 1, control 3 for special added tokens, user-defined 4 for other added tokens, unused 5
    for the `[PAD{i}]` fillers up to the model's vocabulary size), the merges, and
    `tokenizer.ggml.pre`: the name of the pre-tokenizer split, which llama.cpp must know;
  * sentencepiece (`tokenizer.model`: Llama 2, Phi-3) and HF tokenizer.json files converted from
    one (BPE with byte fallback): `tokenizer.ggml.model` = llama, with scores, through the `gguf`
    package's own vocabulary readers.
Special token ids, add_bos/add_eos and the chat template come from the tokenizer's
tokenizer_config.json through `gguf.SpecialVocab` (the converter's own class); the ids phi_jax's
tokenizer knows (BOS, EOS, PAD) win, since they are what phi_jax generated with.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from phi_jax.errors import InputError
from phi_jax.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, HFTokenizer, SentencePieceTokenizer, Tokenizer

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5


def _split_pattern(node: dict[str, Any]) -> str | None:
    pattern = node.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def bpe_pre_name(tokenizer_json: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`) whose split matches this
    tokenizer.json's pre-tokenizer, or None when none of the known ones does.

    llama.cpp's converter names the split by hashing the token ids of a test text; here the
    pre-tokenizer's own definition is read instead, which needs no table of hashes and gives the
    same name for the splits phi_jax meets: GPT-2's (plain ByteLevel), SmolLM's (digits one by one,
    then ByteLevel), Llama 3's and Qwen2's regexes.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(_split_pattern(steps[0]))
    return None


def _byte_level_tokens(tj: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_UNUSED] * n_vocab
    for token, i in tj["model"]["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = token, _NORMAL
    for added in tj.get("added_tokens", []):
        i = int(added["id"])
        if i < n_vocab:
            tokens[i] = added["content"]
            types[i] = _CONTROL if added.get("special") else _USER_DEFINED
    return tokens, types


def _scored_tokens(vocab, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [_UNUSED] * n_vocab
    for i, (text, score, kind) in enumerate(vocab.all_tokens()):
        if i < n_vocab:
            tokens[i], scores[i], types[i] = text, float(score), int(kind)
    return tokens, scores, types


def add_tokenizer(writer, tokenizer: Tokenizer, *, n_vocab: int, pre: str | None = None,
                  add_bos: bool | None = None) -> dict[str, Any]:
    """Write `tokenizer` into `writer`'s metadata (see the module docstring).

    Args:
      n_vocab: the model's vocabulary size (the token list is padded to it, as the converter does).
      pre: the pre-tokenizer name to write (a GGUF source's own); None derives it.
      add_bos: write `tokenizer.ggml.add_bos_token` with this value (None: as tokenizer_config
        says, if it says).
    Returns:
      {"model": "gpt2" | "llama", "pre": name, "tokens": count, "notes": [...]}.
    """
    import gguf

    if tokenizer.vocab_size > n_vocab:
        raise InputError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {n_vocab}; "
                         "export the model with the tokenizer it was trained with")
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="phi_jax-vocab-") as tmp:
        directory = tokenizer.save(Path(tmp))
        if isinstance(tokenizer, HFTokenizer):
            tj = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
            model = tj.get("model", {})
            if model.get("type") == "BPE" and not model.get("byte_fallback"):
                kind = "gpt2"
                tokens, types = _byte_level_tokens(tj, n_vocab)
                if pre is None:
                    pre = bpe_pre_name(tj)
                    if pre is None:
                        pre = "default"
                        notes.append("the tokenizer's pre-tokenizer split matches none llama.cpp names; "
                                     "wrote tokenizer.ggml.pre='default' (llama.cpp may split text "
                                     "differently from phi_jax)")
                writer.add_tokenizer_model(kind)
                writer.add_tokenizer_pre(pre)
                writer.add_token_list(tokens)
                writer.add_token_types(types)
            else:
                kind, pre = "llama", "default"
                vocab = _hf_scored_vocab(gguf, directory, model)
                tokens, scores, types = _scored_tokens(vocab, n_vocab)
                writer.add_tokenizer_model(kind)
                writer.add_tokenizer_pre(pre)
                writer.add_token_list(tokens)
                writer.add_token_scores(scores)
                writer.add_token_types(types)
        elif isinstance(tokenizer, SentencePieceTokenizer):
            kind, pre = "llama", "default"
            tokens, scores, types = _scored_tokens(gguf.vocab.SentencePieceVocab(directory), n_vocab)
            writer.add_tokenizer_model(kind)
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
        else:
            raise InputError(f"cannot write a {type(tokenizer).__name__} into a GGUF file; export with "
                             "a tokenizer.json or sentencepiece tokenizer (load(..., tokenizer=DIR))")
        special = gguf.SpecialVocab(directory, load_merges=kind == "gpt2", n_vocab=n_vocab)
    for typ, token_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if token_id is not None:
            special.special_token_ids[typ] = int(token_id)
    if add_bos is not None:
        special.add_special_token["bos"] = add_bos
    if kind == "gpt2" and not special.merges:
        raise InputError("the byte-level BPE tokenizer has no merges; it cannot be written to GGUF: "
                         "export with the model's full tokenizer.json")
    special.add_to_gguf(writer, quiet=True)
    return {"model": kind, "pre": pre, "tokens": n_vocab, "notes": notes}


def _hf_scored_vocab(gguf, directory: Path, model: dict[str, Any]):
    """A sentencepiece-converted tokenizer.json (BPE with byte fallback) through the `gguf`
    package's reader of such files."""
    if model.get("type") != "BPE":
        raise InputError(f"the tokenizer.json model is {model.get('type')!r}; GGUF export writes byte-level "
                         "BPE or sentencepiece vocabularies: pass the model's tokenizer.model "
                         "(load(..., tokenizer=DIR))")
    try:
        return gguf.vocab.LlamaHfVocab(directory)
    except Exception as e:  # noqa: BLE001 - the package raises plain errors on shapes it refuses
        raise InputError(f"cannot convert this tokenizer.json to a llama vocabulary ({type(e).__name__}: "
                         f"{e}); pass the model's tokenizer.model instead (load(..., tokenizer=DIR))") from e
