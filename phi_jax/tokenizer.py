"""One tokenizer interface over HF `tokenizers` (tokenizer.json, what Phi ships), sentencepiece, and
the vocabulary a GGUF file carries in its metadata.

Everything downstream (data pipeline, sampling, serving, evals) sees only `Tokenizer`, so a model can
be trained with the library's own byte-level BPE, fine-tuned from a Phi checkpoint's tokenizer.json,
paired with a Llama-style `.model` file, or served from a `.gguf` without any caller changing.
A GGUF's byte-level BPE (`tokenizer.ggml.model` = gpt2: SmolLM2, Llama 3, Qwen2, ...) is rebuilt as
an HF `tokenizers` object the way transformers' GGUF loader builds it (its pre-tokenizer split
chosen by `tokenizer.ggml.pre`), so ids are the same.

`encode` never adds special tokens on its own (a tokenizer.json post-processor that would insert
BOS is bypassed); callers say `add_bos`/`add_eos` explicitly, which keeps packing and prompts exact.
Pickle-based formats (`.bin`, `.pkl`, `.pt`) are refused: loading them would run arbitrary code.
"""

from __future__ import annotations

import abc
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from phi_jax import fileio
from phi_jax.errors import ConfigError, InputError, MissingFileError

_PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")
_CONFIG_FILE = "tokenizer_config.json"
_HF_FILE = "tokenizer.json"
_SP_FILE = "tokenizer.model"
# Fallbacks when a tokenizer ships without tokenizer_config.json; the first one present wins.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"


def _token_string(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer(abc.ABC):
    """Text <-> token ids. Build with `Tokenizer.from_pretrained` or `train_bpe`, not directly.

    Attributes:
      bos_id, eos_id, pad_id: ids of the special tokens, or None when the tokenizer has none.
      chat_template: the Jinja chat template from tokenizer_config.json, or None.
    """

    def __init__(self, config: Mapping[str, Any] | None = None):
        self._config = dict(config or {})
        self.chat_template: str | None = self._config.get("chat_template")
        self.bos_id = self._special_id("bos_token", _BOS_CANDIDATES)
        self.eos_id = self._special_id("eos_token", _EOS_CANDIDATES)
        self.pad_id = self._special_id("pad_token", _PAD_CANDIDATES)
        if ("bos_token" not in self._config and self.bos_id is None and self.eos_id is not None
                and self.id_to_token(self.eos_id) == ENDOFTEXT):
            self.bos_id = self.eos_id  # GPT-2 / Phi convention: <|endoftext|> is both.

    # ---- backend-specific ------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (including added/special tokens)."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special (control) tokens, token string -> id."""

    @abc.abstractmethod
    def _encode(self, texts: list[str]) -> list[list[int]]:
        ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text; special tokens are dropped unless `skip_special_tokens=False`."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. a stop token), or None when absent."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id, or None when out of range."""

    @abc.abstractmethod
    def _save_model(self, directory: pathlib.Path) -> None:
        ...

    # ---- shared ----------------------------------------------------------------------------------
    def _special_id(self, key: str, candidates: Sequence[str]) -> int | None:
        if key in self._config:  # An explicit null in the config means "none", not "guess".
            token = _token_string(self._config[key])
            return None if token is None else self.token_to_id(token)
        for token in candidates:
            if token in self.special_tokens:
                return self.special_tokens[token]
        return None

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise InputError("add_bos=True but this tokenizer has no BOS token; set bos_token in "
                                 "tokenizer_config.json or call encode(..., add_bos=False)")
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id is None:
                raise InputError("add_eos=True but this tokenizer has no EOS token; set eos_token in "
                                 "tokenizer_config.json or call encode(..., add_eos=False)")
            ids = ids + [self.eos_id]
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> token ids; BOS/EOS only when asked for."""
        return self._wrap(self._encode([text])[0], add_bos, add_eos)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Text -> (ids, [(start, end) character span of each token]); no BOS/EOS. Chat
        fine-tuning uses the spans to find the tokens of the assistant's answers."""
        raise InputError(f"{type(self).__name__} gives no token offsets; chat fine-tuning needs a "
                         "tokenizer.json (HF tokenizers) tokenizer: convert it with transformers "
                         "(`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`)")

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        """Like `encode` for many texts at once (parallel in the HF backend)."""
        return [self._wrap(ids, add_bos, add_eos) for ids in self._encode(list(texts))]

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Writes the tokenizer file and tokenizer_config.json (readable by transformers too)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_model(directory)
        config = dict(self._config)
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                              ("pad_token", self.pad_id)):
            config[key] = None if token_id is None else self.id_to_token(token_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / _CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special token strings a chat template sees, as transformers passes them:
        `render_chat(messages, tok.chat_template, **tok.special_tokens_map)`. BOS and EOS are
        always there ("" when the tokenizer has none); UNK and PAD when it has them."""
        out = {}
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                              ("pad_token", self.pad_id)):
            token = None if token_id is None else self.id_to_token(token_id)
            if token is not None or key in ("bos_token", "eos_token"):
                out[key] = token or ""
        unk = _token_string(self._config.get("unk_token"))
        if unk is not None and self.token_to_id(unk) is not None:
            out["unk_token"] = unk
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")

    @staticmethod
    def from_pretrained(path: str | os.PathLike) -> Tokenizer:
        """Loads tokenizer.json (HF), a sentencepiece `.model` or a `.gguf` file's vocabulary, from a
        directory or the file itself.

        In a directory tokenizer.json wins over tokenizer.model; tokenizer_config.json beside the file
        supplies the BOS/EOS/PAD strings and the chat template (a GGUF carries its own).
        """
        fix = f"pass a directory with {_HF_FILE} or {_SP_FILE}, the file itself, or a .gguf file"
        if fileio.is_remote(path):  # gs://...: the tokenizer files only, fetched to a local cache
            if not fileio.as_path(path).exists():
                raise fileio.missing(path, "tokenizer path", fix)
            path = fileio.local_copy(path, only=(_HF_FILE, _CONFIG_FILE, "*.model"))
        path = pathlib.Path(path)
        if not path.exists():
            raise MissingFileError(f"tokenizer path {str(path)!r} does not exist; {fix}")
        if path.is_dir():
            candidates = [path / _HF_FILE, path / _SP_FILE] + sorted(path.glob("*.model"))
            found = [p for p in candidates if p.is_file()]
            if not found:
                present = sorted(p.name for p in path.iterdir())
                raise MissingFileError(f"no {_HF_FILE} or *.model in {str(path)!r} (found: {present}); "
                                       "convert slow/pickled tokenizers with transformers first "
                                       "(`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)")
            path = found[0]
        if path.suffix in _PICKLE_SUFFIXES:
            raise InputError(f"refusing to load {str(path)!r}: {path.suffix} files are pickles and loading "
                             f"one runs arbitrary code; use the model's {_HF_FILE} or a sentencepiece "
                             ".model instead")
        if path.suffix == ".gguf":
            return tokenizer_from_gguf(path)
        config = _read_config(path.parent / _CONFIG_FILE)
        if path.suffix == ".json":
            import tokenizers  # pylint: disable=g-import-not-at-top
            try:
                backend = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception on a bad file
                raise InputError(f"{path} is not a readable tokenizer.json ({e}); the file is corrupt "
                                 "or not an HF `tokenizers` file: copy it again from the model") from None
            return HFTokenizer(backend, config)
        if path.suffix == ".model":
            return SentencePieceTokenizer(path.read_bytes(), config, source=str(path))
        raise InputError(f"unknown tokenizer file {str(path)!r}: expected {_HF_FILE} (HF tokenizers), "
                         "a sentencepiece .model or a .gguf file")


def _read_config(file: pathlib.Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); fix or regenerate it") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(config).__name__}; regenerate it")
    return config


class HFTokenizer(Tokenizer):
    """Backend for tokenizer.json files (HF `tokenizers`, Rust; batch encoding is parallel)."""

    def __init__(self, backend, config: Mapping[str, Any] | None = None):
        self.backend = backend
        self._special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        super().__init__(config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def _encode(self, texts):
        if len(texts) == 1:
            return [self.backend.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text):
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def decode(self, ids, skip_special_tokens=True):
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id):
        return self.backend.id_to_token(int(token_id))

    def _save_model(self, directory):
        self.backend.save(str(directory / _HF_FILE))

    def __getstate__(self):  # Grain workers receive the tokenizer by pickling.
        return {"json": self.backend.to_str(), "config": self._config}

    def __setstate__(self, state):
        import tokenizers  # pylint: disable=g-import-not-at-top
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), state["config"])


class SentencePieceTokenizer(Tokenizer):
    """Backend for sentencepiece `.model` files (Llama/Gemma style)."""

    def __init__(self, model_proto: bytes, config: Mapping[str, Any] | None = None,
                 source: str = "the sentencepiece model"):
        import sentencepiece as spm  # pylint: disable=g-import-not-at-top
        self._proto = model_proto
        try:
            self.backend = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise InputError(f"{source} is not a readable sentencepiece model ({e}); copy it again "
                             "from the model") from None
        sp = self.backend
        self._special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                         if sp.is_control(i) or sp.is_unknown(i)}
        super().__init__(config)
        # sentencepiece records its own control ids; tokenizer_config.json (if any) already won above.
        for attr, sp_id in (("bos_id", sp.bos_id()), ("eos_id", sp.eos_id()), ("pad_id", sp.pad_id())):
            if getattr(self, attr) is None and sp_id >= 0 and attr[:3] + "_token" not in self._config:
                setattr(self, attr, sp_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_piece_size()

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def _encode(self, texts):
        return self.backend.encode(texts, out_type=int)

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        special = set(self._special.values())
        if skip_special_tokens:
            return self.backend.decode([i for i in ids if i not in special])
        # sentencepiece drops control pieces when decoding; render them in place instead.
        pieces, run = [], []
        for i in ids:
            if i in special:
                pieces.append(self.backend.decode(run))
                pieces.append(self.backend.id_to_piece(i))
                run = []
            else:
                run.append(i)
        pieces.append(self.backend.decode(run))
        return "".join(pieces)

    def token_to_id(self, token):
        token_id = self.backend.piece_to_id(token)
        if token_id == self.backend.unk_id() and token != self.backend.id_to_piece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id):
        token_id = int(token_id)
        return self.backend.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def _save_model(self, directory):
        (directory / _SP_FILE).write_bytes(self._proto)

    def __getstate__(self):
        return {"proto": self._proto, "config": self._config}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["config"])


def train_bpe(texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = (ENDOFTEXT, PAD), min_frequency: int = 2,
              length: int | None = None) -> HFTokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style, like Phi's) with the `tokenizers` library.

    Byte-level means every string round-trips and no input is ever unknown. `<|endoftext|>` becomes
    EOS and BOS (as in Phi), `<|pad|>` becomes PAD when listed. Deterministic for the same texts.

    Args:
      texts: training documents (any iterable; consumed once).
      vocab_size: final vocabulary size including the 256 byte symbols and the special tokens.
      special_tokens: added first, so they get ids 0, 1, ...
      min_frequency: a pair must occur this often to be merged.
      length: number of texts, only for progress reporting.
    """
    from tokenizers import Tokenizer as _Tok  # pylint: disable=g-import-not-at-top
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    if vocab_size < 256 + len(special_tokens):
        raise InputError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 256 byte "
                         f"symbols plus {len(special_tokens)} special tokens")
    backend = _Tok(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer, length=length)
    eos = ENDOFTEXT if ENDOFTEXT in special_tokens else (special_tokens[0] if special_tokens else None)
    config = {"bos_token": eos, "eos_token": eos, "pad_token": PAD if PAD in special_tokens else None,
              "unk_token": None, "tokenizer_class": "PreTrainedTokenizerFast",
              "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    return HFTokenizer(backend, config)


# -------------------------------------------------------------------------------------- GGUF
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp's token types
# How text is split before BPE, by `tokenizer.ggml.pre`: the patterns of the models' own
# tokenizer.json files (and of transformers' GGUF loader). Other kinds ("default", "gpt-2",
# "smollm", ...) use byte-level BPE's GPT-2 pattern, as transformers does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {**dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"),
                                _LLAMA3_SPLIT),
                **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes (what byte-level BPE vocabularies are written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def tokenizer_from_gguf(path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> HFTokenizer:
    """The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata, its special tokens
    (BOS/EOS/PAD, control tokens kept whole) and `tokenizer.chat_template`.

    `metadata`: the file's metadata when the caller has read it already (it names `path` in errors).
    """
    from phi_jax import gguf_file  # pylint: disable=g-import-not-at-top
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers  # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer as _Tok
    from tokenizers.models import BPE

    md = gguf_file.read_metadata(path, "tokenizer.") if metadata is None else metadata
    kind, tokens = md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise InputError(f"{path} has no tokenizer metadata (tokenizer.ggml.model and "
                         "tokenizer.ggml.tokens are missing); pass the model's tokenizer.json "
                         "directory as the tokenizer instead (load_gguf(..., tokenizer=DIR))")
    if kind != "gpt2":
        raise InputError(f"{path}: tokenizer.ggml.model is {kind!r}; phi_jax rebuilds byte-level BPE "
                         "vocabularies ('gpt2': SmolLM2, Llama 3, Qwen2, Phi-4) from GGUF. Pass the "
                         "model's tokenizer.json (or tokenizer.model) directory as the tokenizer "
                         "(load_gguf(..., tokenizer=DIR))")
    merges = md.get("tokenizer.ggml.merges")
    if not merges:
        raise InputError(f"{path} has a byte-level vocabulary without tokenizer.ggml.merges; the file "
                         "is incomplete: convert it again with llama.cpp's convert_hf_to_gguf.py")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    backend = _Tok(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                       continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    split = _GGUF_SPLITS.get(md.get("tokenizer.ggml.pre"))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types)
                                if kind == _GGUF_CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == _GGUF_USER_DEFINED and t in vocab])

    def token(key: str) -> str | None:
        token_id = md.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None

    config = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
              "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if md.get("tokenizer.chat_template"):
        config["chat_template"] = md["tokenizer.chat_template"]
    return HFTokenizer(backend, config)
