"""lm-evaluation-harness model `phi_jax` (optional extra: `pip install lm-eval`).

Importing this module registers the model class with lm-eval's registry:

    import phi_jax.evals.lm_eval_adapter  # registers "phi_jax"
    import lm_eval
    lm_eval.simple_evaluate(model="phi_jax", model_args="hf=/path/to/phi-2", tasks=["arc_easy"])

or from the shell, `python -m phi_jax.evals.lm_eval_adapter --model phi_jax --model_args hf=DIR
--tasks arc_easy` (lm-eval's own CLI with the model registered first).

Log-likelihoods come from `phi_jax.inference.scoring` (lm-eval's context/continuation tokenization),
rolling log-likelihoods from lm-eval's own disjoint rolling windows, generation from
`phi_jax.generate` cut at the request's `until` strings. Only this module imports lm_eval.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval") from e

from phi_jax.inference import loader, scoring


@register_model("phi_jax")
class PhiJaxLM(LM):
    """A phi_jax model behind lm-eval's `LM` interface.

    Args (strings from `model_args`, or objects when built in Python):
      model: a model path — an HF dir, a phi_jax workdir or a .gguf (`phi_jax.inference.load`) —
        or an already loaded Phi module (then pass `variables` and `tokenizer` too); `hf` and
        `checkpoint` are aliases of the path form, kept for one release.
      tokenizer: a Tokenizer object, or a path (default: the one beside the model).
      batch_size: rows per forward pass when scoring, prompts per generate call.
      max_gen_toks: default generation length when a request does not set one.
    """

    def __init__(self, hf: str | None = None, checkpoint: str | None = None,
                 tokenizer: Any = None, model: Any = None, variables: Any = None,
                 batch_size: int | str = 8, max_gen_toks: int | str = 256,
                 dtype: str | None = None, **unused: Any):
        super().__init__()
        path = model if isinstance(model, str) else (hf or checkpoint)
        if path is not None:
            loaded = loader.load(path, dtype=dtype or "float32",
                                 tokenizer=tokenizer if isinstance(tokenizer, str) else None)
            model, variables = loaded.model, loaded.variables
            tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) \
                else loaded.tokenizer
        if model is None or tokenizer is None:
            raise ValueError("pass model=PATH (with a tokenizer beside it, or tokenizer=PATH), or a "
                             "loaded model with variables and tokenizer")
        if isinstance(tokenizer, str):
            tokenizer = loader.load_tokenizer(tokenizer)
        self.model, self.variables, self.tokenizer = model, variables, tokenizer
        self.batch_size = int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 8
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = int(model.config.max_len)

    @property
    def _prefix_token(self) -> int:
        tok = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        if tok is None:
            raise ValueError("the tokenizer has no BOS/EOS token for rolling log-likelihood")
        return tok

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        scores = scoring.score_texts(self.model, self.variables, self.tokenizer, pairs,
                                     batch_size=self.batch_size)
        out = []
        for pair, s in zip(pairs, scores):
            self.cache_hook.add_partial("loglikelihood", pair, (s.logprob, s.is_greedy))
            out.append((s.logprob, s.is_greedy))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args[:1]
            tokens = self.tokenizer.encode(text)
            for w in get_rolling_token_windows(token_list=tokens, prefix_token=self._prefix_token,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        scores = scoring.score_requests(self.model, self.variables, windows,
                                        batch_size=self.batch_size)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, scores):
            totals[i] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests) -> list[str]:
        from phi_jax.inference.decode import generate

        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0))
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            top_k = int(kwargs.pop("top_k", 0) or 0)
            settings.append((context, until, max_new))
            groups.setdefault((max_new, temperature, top_p, top_k), []).append(i)
        results: list[str | None] = [None] * len(requests)
        stop = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        for (max_new, temperature, top_p, top_k), idx in groups.items():
            budget = max(1, self.max_length - max_new)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                prompts = []
                for i in chunk:
                    ids = self.tokenizer.encode(settings[i][0]) or [self._prefix_token]
                    prompts.append(ids[-budget:])
                new = generate(self.model, self.variables, prompts, max_new_tokens=max_new,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               stop_tokens=stop)
                for i, ids in zip(chunk, new):
                    text = self.tokenizer.decode(ids)
                    for s in settings[i][1]:
                        if s and s in text:
                            text = text[:text.index(s)]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


def main() -> None:
    """lm-eval's command line with `phi_jax` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
