"""Text in, text out: what `Loaded.generate / chat / logprobs / score / embed` do, over the one
decoder (`decode.generate`), the one scorer (`scoring`) and the one embedder (`embed.Embedder`).

Why a module of its own: the CLI's `sample`, the server and a notebook must turn the same text
into the same ids and back, or "greedy `generate` equals the server" stops being true. So prompts
are encoded the way `phi-jax sample` and the server encode them (no BOS unless asked; an empty
prompt starts from BOS), chat messages are rendered with the model's template exactly as
`/v1/chat/completions` renders them, and completions are detokenized by the server's
`TextAssembler` (whole-sequence decoding, stop strings cut as OpenAI's `stop` cuts them).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from phi_jax.errors import InputError


def _tokenizer(loaded):
    if loaded.tokenizer is None:
        raise InputError("this model was loaded without a tokenizer, so it cannot take text; pass "
                         "tokenizer=PATH to phi_jax.load (a tokenizer.json or .model), or use "
                         "phi_jax.generate with token ids")
    return loaded.tokenizer


def encode_prompt(tokenizer, text: str, *, add_bos: bool = False) -> list[int]:
    """Prompt ids as `phi-jax sample` and the server make them: BOS only when asked for, and an
    empty prompt starts from BOS (as OpenAI's API allows "")."""
    ids = tokenizer.encode(text, add_bos=add_bos)
    if not ids:
        if tokenizer.bos_id is None:
            raise InputError("the prompt is empty and the tokenizer has no BOS token to start from; "
                             "give a non-empty prompt")
        ids = [tokenizer.bos_id]
    return ids


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise InputError(f"stop={stop!r}: give a string or a list of strings")
    return [s for s in stops if s]


def generate(loaded, prompt: str | Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stop: str | Sequence[str] | None = None, add_bos: bool = False) -> str | list[str]:
    """Completions of `prompt` (a string, or a list of them decoded as one batch): the new text
    only, cut before the first stop string, without the end-of-sequence token. Prompt i of a list
    samples with seed + i, as `phi-jax sample --num-samples` and the server's choices do."""
    from phi_jax.inference import decode
    from phi_jax.inference.detokenize import TextAssembler
    from phi_jax.inference.sampling import SamplingParams

    tokenizer = _tokenizer(loaded)
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompt must be a string or a non-empty list of strings")
    ids = [encode_prompt(tokenizer, p, add_bos=add_bos) for p in prompts]
    config = loaded.model.config
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else config.eos_token_id
    stop_ids = () if eos is None else (int(eos),)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_token_ids=stop_ids).validated(
        vocab_size=config.vocab_size, context=config.max_len,
        prompt_length=max(len(x) for x in ids), flag_prefix="")
    stops = _stop_list(stop)
    texts = [TextAssembler(tokenizer, stops) for _ in prompts]

    def collect(row: int, token: int) -> bool:
        if token in stop_ids:
            return True
        texts[row].add(token)
        return texts[row].stopped

    decode.generate(loaded.model, loaded.variables, ids, params.max_tokens,
                    temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                    seed=params.seed, stop_tokens=list(stop_ids), callback=collect)
    out = []
    for t in texts:
        t.finish()
        out.append(t.text)
    return out[0] if single else out


def render(loaded, messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt text of a conversation: the model's chat template (ChatML when it has none)
    with the tokenizer's special tokens, as `/v1/chat/completions` renders it."""
    from phi_jax.chat import render_chat

    tokenizer = _tokenizer(loaded)
    if isinstance(messages, Mapping) or not all(isinstance(m, Mapping) for m in messages):
        raise InputError('messages must be a list of {"role": ..., "content": ...} dicts')
    return render_chat(list(messages), loaded.chat_template, **tokenizer.special_tokens_map)


def chat(loaded, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
    """The assistant's reply to `messages` (see `render` and `generate`)."""
    return generate(loaded, render(loaded, messages), **kwargs)


def logprobs(loaded, text: str) -> list[float]:
    """log p of each token of `tokenizer.encode(text)` after the first, given the tokens before it
    (the scorer behind the server's echo + logprobs)."""
    from phi_jax.inference import scoring

    ids = _tokenizer(loaded).encode(text)
    if not ids:
        raise InputError("the text is empty: there are no tokens to score")
    return scoring.token_logprobs(loaded.model, loaded.variables, ids)[0]


def score(loaded, context: str, continuation: str) -> float:
    """Sum of the continuation's token log-probs given the context, tokenized as lm-eval-harness
    and phi_jax's multiple-choice eval do (`scoring.encode_pair`)."""
    from phi_jax.inference import scoring

    if not continuation:
        raise InputError("the continuation is empty: there is nothing to score")
    return scoring.score_texts(loaded.model, loaded.variables, _tokenizer(loaded),
                               [(context, continuation)])[0].logprob


def embed(loaded, texts: str | Sequence[str], *, max_tokens: int = 512,
          batch_size: int = 16) -> np.ndarray:
    """Mean-pooled final hidden states, float32 [N, D]: the vectors curation's classifier,
    decontamination and synthesis diversity use (`embed.Embedder`)."""
    from phi_jax.inference.embed import Embedder

    texts = [texts] if isinstance(texts, str) else list(texts)
    embedder = Embedder(loaded.model, loaded.variables, _tokenizer(loaded), max_tokens=max_tokens,
                        batch_size=batch_size)
    return embedder(texts)


def save(loaded, path, *, quant: str | None = None, overwrite: bool = False,
         dtype: Any = None) -> Any:
    """Write the model where other tools read it: `path` ending in .gguf -> a GGUF file
    (llama.cpp; `quant` picks its tensor type), anything else -> an HF directory transformers
    loads, with the tokenizer and chat template. A LoRA adapter is merged into the weights."""
    if str(path).lower().endswith(".gguf"):
        from phi_jax.gguf_export import save_gguf

        return save_gguf(loaded, path, quant=quant or "f32", overwrite=overwrite)
    if quant is not None:
        raise InputError(f"quant={quant!r} applies to GGUF files; give a path ending in .gguf, or "
                         "leave quant out for an HF directory (dtype= sets its precision)")
    from phi_jax import lora

    tokenizer = loaded.tokenizer
    if tokenizer is not None and loaded.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = loaded.chat_template
    return lora.save_merged(path, loaded.model.config, loaded.variables, tokenizer,
                            overwrite=overwrite, dtype=dtype)
