"""The one loader: any model source -> (model, variables, tokenizer, chat template, metadata).

Sources, told apart by what is on disk:
  * an HF directory (config.json + safetensors), as the hub and `phi-jax convert` write them;
  * a phi_jax training workdir (checkpoints/), latest step or a given one, params only (the
    optimizer state is never read, so inference needs a fraction of training's memory);
  * a GGUF file (llama.cpp's format; weights dequantized, tokenizer and chat template rebuilt);
and, on any of them, a LoRA adapter (`adapter=DIR`: PEFT's adapter_config.json +
adapter_model.safetensors, as `phi-jax finetune` writes them; `phi_jax.lora`).
Every command that needs a model (`sample`, `serve`, `eval`, `convert`, `data`, `finetune`) goes
through `load`, and so does library code that wants "a model from a path". Any of them may be in
a bucket (gs://...): a workdir's checkpoint is restored from it directly (Orbax, TensorStore); an HF
directory or GGUF file is fetched once into the local cache (`phi_jax.fileio.local_copy`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from phi_jax import fileio
from phi_jax.errors import InputError, MissingFileError, PhiJaxError

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Names that stand for an installed model file rather than a path: the offline teacher.
ALIASES = ("smollm2", "smollm2-135m-instruct")


def resolve(path: str | os.PathLike):
    """A model path as given (a `Path`, or an `epath.Path` for gs://...), or the installed file an
    alias names (`--model=smollm2`)."""
    if str(path).lower() in ALIASES and not Path(path).exists():
        from phi_jax import gguf

        return gguf.find_smollm2()
    return fileio.as_path(path)


@dataclasses.dataclass
class Loaded:
    """What `load` returns: a model that speaks text, with JAX's explicit pieces in reach.

        m = phi_jax.load("smollm2")
        m.chat([{"role": "user", "content": "What is a list comprehension?"}])
        logits, _ = m.model.apply(m.variables, tokens)   # the pure (module, variables) underneath

    Attributes:
      model: the `phi_jax.model.Phi` module (in the layout that decodes fastest here unless
        `layout="training"` was asked for).
      variables: {"params": ...}.
      tokenizer: a `phi_jax.Tokenizer`, or None when the source has none and none was given.
      chat_template: the tokenizer's Jinja chat template, or None.
      metadata: where it came from: {"source": "hf"|"workdir"|"gguf", "path", "step"?, ...}.
    """

    model: Any
    variables: dict
    tokenizer: Any
    chat_template: str | None
    metadata: dict

    def __iter__(self):  # model, variables, tokenizer = load(...)
        return iter((self.model, self.variables, self.tokenizer))

    @property
    def config(self):
        """The model's `ModelConfig`."""
        return self.model.config

    # Text in, text out (phi_jax.inference.text): the one decoder, scorer and embedder underneath.
    def generate(self, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop=None,
                 add_bos: bool = False):
        """The completion of `prompt` (str -> str; list[str] -> list[str], one batch), without the
        prompt. Greedy by default; equals `phi-jax sample` and the server for the same settings.

        Args:
          prompt: text, or a list of texts (text i samples with seed + i).
          max_new_tokens: the most tokens to add.
          temperature: 0 = greedy; top_p (1 = off) and top_k (0 = off) filter sampling.
          seed: sampling seed; the tokens depend only on the prompt, seed and settings.
          stop: a string or list of strings that ends the completion (not included).
          add_bos: prepend the BOS token (models trained with it, e.g. Llama-family base models).
        """
        from phi_jax.inference import text

        return text.generate(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, stop=stop, add_bos=add_bos)

    def chat(self, messages, **kwargs) -> str:
        """The assistant's reply to `messages` ([{"role": "user", "content": "..."}, ...]) under the
        model's chat template (ChatML when it has none), as `/v1/chat/completions` answers; takes
        `generate`'s keyword arguments."""
        from phi_jax.inference import text

        return text.chat(self, messages, **kwargs)

    def logprobs(self, text: str) -> list[float]:
        """log p of each token of `tokenizer.encode(text)` after the first, given the ones before."""
        from phi_jax.inference import text as _text

        return _text.logprobs(self, text)

    def score(self, context: str, continuation: str) -> float:
        """Sum of `continuation`'s token log-probs after `context`, as the multiple-choice eval
        scores an option."""
        from phi_jax.inference import text

        return text.score(self, context, continuation)

    def embed(self, texts, **kwargs):
        """Mean-pooled final hidden states of each text: a float32 numpy array [N, D]."""
        from phi_jax.inference import text

        return text.embed(self, texts, **kwargs)

    def save(self, path, *, quant: str | None = None, overwrite: bool = False, dtype=None):
        """Write the model: an HF directory transformers loads (tokenizer and chat template
        included), or a GGUF file for llama.cpp when `path` ends in .gguf (`quant`: f32, f16,
        bf16, q8_0, q4_0, q4_1). A LoRA adapter is merged in. Writes are atomic."""
        from phi_jax.inference import text

        return text.save(self, path, quant=quant, overwrite=overwrite, dtype=dtype)


def source_kind(path: str | os.PathLike) -> str:
    """"hf", "workdir" or "gguf" for a model path; a one-line error for anything else."""
    p = resolve(path)
    if not p.exists():
        raise fileio.missing(p, "model path", "pass --model=PATH: an HF checkpoint directory, a "
                                              "phi_jax training workdir or a .gguf file")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        raise InputError(f"model path {str(p)!r} is a file but not a .gguf; pass an HF checkpoint "
                         "directory, a phi_jax training workdir or a .gguf file")
    if (p / "checkpoints").is_dir():
        return "workdir"
    if (p / "config.json").is_file():
        return "hf"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    present = sorted(x.name for x in p.iterdir())[:8]
    raise InputError(f"{str(p)!r} is neither an HF checkpoint (config.json), a phi_jax workdir "
                     f"(checkpoints/) nor a .gguf file (it holds {present}); point --model at one")


def load_tokenizer(path: str | os.PathLike):
    """A `phi_jax.Tokenizer` from a directory or file (tokenizer.json / .model / .gguf).

    A file the tokenizer libraries cannot parse is reported as bad input naming the path, not as
    their own exception.
    """
    from phi_jax.tokenizer import Tokenizer

    try:
        return Tokenizer.from_pretrained(path)
    except PhiJaxError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers/sentencepiece raise their own types
        raise InputError(f"cannot read the tokenizer at {path} ({type(e).__name__}: "
                         f"{str(e)[:200]}); replace the file with a valid tokenizer.json or "
                         ".model, or pass --tokenizer=PATH") from e


def _tokenizer_beside(directory: Path):
    if any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return load_tokenizer(directory)
    return None


def load(path: str | os.PathLike, *, dtype: Any = "float32", step: int | None = None,
         tokenizer: str | os.PathLike | None = None, layout: str = "inference",
         adapter: str | os.PathLike | None = None, quantize: str | None = None,
         kv_cache_dtype: str | None = None) -> Loaded:
    """Load a model from any source (see the module docstring).

    Args:
      path: an HF directory, a workdir, or a .gguf file (or a directory holding exactly one).
      dtype: parameter and compute dtype ("float32", "bfloat16", "float16").
      step: workdir only: this checkpoint step instead of the latest.
      tokenizer: a tokenizer path that overrides the one found beside the model.
      layout: "inference" (unstacked layers on CPU, where that decodes faster) or "training"
        (scanned layers, as the trainer builds them).
      adapter: a LoRA adapter directory to apply on top of the model (the model runs with it;
        `phi_jax.lora.merge` folds it into the weights).
      quantize: None, "int8" (per output channel) or "int4" (groups of 32; "int4:128" and
        "int8:32" name a group): weight-only quantization of the linear layers, dequantized inside
        the jitted step (`phi_jax.quant`). A GGUF file stored in q8_0 (int8), or q4_0 with q8_0
        (int4), keeps its blocks exactly (groups of 32). Inference layout only.
      kv_cache_dtype: None (the model dtype) or "int8": the decoder's KV cache in int8 with a
        scale per token and kv head.
    """
    from phi_jax.config import dtype_name
    from phi_jax.model import Phi, decode_prefers_unstacked, inference_layout, stack_layers

    if layout not in ("inference", "training"):
        raise ValueError(f"layout={layout!r}; use 'inference' or 'training'")
    dtype = dtype_name(dtype)
    kind = source_kind(path)
    path = resolve(path)
    unstacked = layout == "inference" and decode_prefers_unstacked()
    meta: dict[str, Any] = {"source": kind, "path": str(path)}
    if kind != "workdir":  # a bucket's HF directory or GGUF file: read from a local copy
        path = fileio.local_copy(path)
    if kind == "hf":
        from phi_jax import hf

        try:
            config, variables = hf.load_hf(path, dtype=dtype, scan_layers=not unstacked)
        except PhiJaxError:
            raise
        except (ValueError, TypeError, KeyError, OSError) as e:  # hf.py's messages name the file
            raise InputError(f"cannot load the HF checkpoint in {path}: {e}") from e
        model, found = Phi(config), _tokenizer_beside(path)
    elif kind == "workdir":
        from phi_jax import checkpoint

        if step is not None and step < 0:
            raise InputError(f"--step={step}: checkpoint steps are >= 0")
        config, variables, loaded_step = checkpoint.load_params_for_inference(path, step=step,
                                                                             dtype=dtype)
        log.info("loaded step %d from %s", loaded_step, path)
        meta["step"] = loaded_step
        model = Phi(config)
        if unstacked:
            model, variables = inference_layout(model, variables)
        elif layout == "training":  # a run trained with unrolled layers (configs/tiny.py) too
            model, variables = stack_layers(model, variables)
        found = _tokenizer_beside(path / "tokenizer")
    else:
        from phi_jax import gguf

        file = path if path.is_file() else next(iter(sorted(path.glob("*.gguf"))))
        config, variables, found, info = gguf.load_gguf(file, dtype=dtype, scan_layers=not unstacked,
                                                        tokenizer=tokenizer)
        meta.update(info, path=meta["path"] if fileio.is_remote(meta["path"]) else str(file))
        model = Phi(config)
    if adapter is not None:
        from phi_jax import lora

        # a bucket adapter is read from a local copy (safetensors needs a real file)
        local = fileio.local_copy(adapter) if fileio.is_remote(adapter) else adapter
        lora_config, variables = lora.load_adapter(local, model.config, variables)
        model = Phi(lora_config)
        meta["adapter"] = str(adapter)
    if quantize or kv_cache_dtype:
        model, variables = _quantized(model, variables, quantize, kv_cache_dtype, layout, meta)
    if step is not None and kind != "workdir":
        raise InputError(f"--step={step} applies to phi_jax workdirs only; {path} is an {kind} source")
    tok = load_tokenizer(tokenizer) if tokenizer else found
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise InputError(f"the tokenizer has {tok.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}; pass the tokenizer this model was trained with")
    template = getattr(tok, "chat_template", None) if tok is not None else None
    return Loaded(model, variables, tok, template, meta)


# The file types our layout holds exactly in groups of 32 (the int4 model's head is int8: q8_0).
_GGUF_BLOCKS = {"int8": {"Q8_0"}, "int4": {"Q4_0", "Q8_0"}}


def _quantized(model, variables, quantize, kv_cache_dtype, layout: str, meta: dict):
    """(model, variables) with the quantization switches set and the kernels quantized."""
    from phi_jax import quant
    from phi_jax.model import Phi

    mode, group = quant.parse_quantize(quantize)
    if mode and layout == "training":
        raise InputError(f"quantize={quantize!r} is for inference: the trainer updates float weights; "
                         "load with layout='inference' or without quantize")
    types = meta.get("quantization") or {}
    if mode and meta["source"] == "gguf" and ":" not in str(quantize):
        # Keep a q8_0 / q4_0 file's blocks: its 32-row groups re-quantize to the same integers
        # and scales (quant's rounding rules are their own fixed points), no second rounding.
        matmul_types = {t for t in types if t not in ("F32", "F16", "BF16")}
        if matmul_types and matmul_types <= _GGUF_BLOCKS[mode]:
            quantize = f"{mode}:32"
    config = quant.quantized_config(model.config, quantize, kv_cache_dtype)
    variables = quant.quantize_params(config, variables)
    if mode:
        meta["quantized"] = quant.summary(variables, config)
    return Phi(config), variables


def require_tokenizer(loaded: Loaded, path: str | os.PathLike):
    """The loaded tokenizer, or a one-line error saying where one should be."""
    if loaded.tokenizer is None:
        where = fileio.as_path(path)
        where = where / "tokenizer" if loaded.metadata["source"] == "workdir" else where
        raise MissingFileError(f"no tokenizer.json or tokenizer.model in {where}; copy the tokenizer "
                               "files there or pass --tokenizer=PATH")
    return loaded.tokenizer
