"""Multiple-choice scoring: a hand-computed bigram example, and a tiny Phi against a direct forward."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax.config import preset
from phi_jax.evals import choice
from phi_jax.inference import scoring
from phi_jax.model import Phi, init_params

ALPHABET = "abcd "


class _AlphabetTokenizer:
    """One id per character of ALPHABET; no special tokens."""

    bos_id = eos_id = pad_id = None
    vocab_size = len(ALPHABET)

    def encode(self, text, add_bos=False, add_eos=False):
        return [ALPHABET.index(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ALPHABET[i] for i in ids)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    max_len: int = 32


class _Bigram(nn.Module):
    """p(next | current) from a fixed table: log-probabilities we can add up by hand."""

    table: tuple
    config: _Cfg = _Cfg()

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, deterministic=True):
        return jnp.asarray(self.table, jnp.float32)[tokens], None


def _bigram_table():
    probs = np.full((5, 5), 0.2)
    b, c, d = 1, 2, 3
    probs[b] = 0.0
    probs[b, c], probs[b, d] = math.exp(-1.0), math.exp(-0.9)
    rest = (1 - probs[b, c] - probs[b, d]) / 3
    probs[b, [0, 1, 4]] = rest
    probs[d] = (1 - math.exp(-0.3)) / 4
    probs[d, d] = math.exp(-0.3)
    assert np.allclose(probs.sum(1), 1)
    return tuple(map(tuple, np.log(probs).tolist()))


def test_hand_computed_bigram_example():
    model = _Bigram(_bigram_table())
    examples = [
        # "c" after "b": -1.0; "ddd": -0.9 - 0.3 - 0.3 = -1.5. The sum prefers "c" (wrong),
        # per character -1.0 vs -0.5 prefers "ddd" (right).
        {"context": "ab", "choices": ["c", "ddd"], "label": 1},
        # "d": -0.9 beats "c": -1.0 under every rule.
        {"context": "b", "choices": ["d", "c"], "label": 0},
    ]
    res = choice.evaluate(model, {}, _AlphabetTokenizer(), examples, batch_size=4)
    assert res["examples"][0]["logprobs"] == pytest.approx([-1.0, -1.5], abs=1e-6)
    assert res["examples"][1]["logprobs"] == pytest.approx([-0.9, -1.0], abs=1e-6)
    assert res["examples"][0]["num_tokens"] == [1, 3]
    assert [r["pred_acc"] for r in res["examples"]] == [0, 0]
    assert [r["pred_acc_norm"] for r in res["examples"]] == [1, 0]
    assert res["acc"] == 0.5 and res["acc_norm"] == 1.0 and res["acc_token_norm"] == 1.0
    assert res["num_examples"] == 2


def test_trailing_context_space_moves_to_the_continuation():
    ctx, cont = scoring.encode_pair(_AlphabetTokenizer(), "ab ", "cd")
    assert ctx == [0, 1] and cont == [4, 2, 3]


class _AsciiTokenizer:
    bos_id = eos_id = 0
    pad_id = None
    vocab_size = 128

    def encode(self, text, add_bos=False, add_eos=False):
        return ([0] if add_bos else []) + [ord(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


@functools.lru_cache(maxsize=None)
def _forward(model):
    return jax.jit(lambda v, t: model.apply(v, t)[0])


def _direct_logp(model, variables, ids, length=32):
    """Reference: one unpacked causal forward (right zero-padding cannot change earlier logits)."""
    fwd = _forward(model)
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(jax.nn.log_softmax(fwd(variables, padded)[0], axis=-1))[:len(ids)]


@pytest.fixture(scope="module")
def tiny_phi():
    """All scoring below lands in one 32-token bucket: two compilations for the whole module."""
    config = preset("test", max_len=32)
    return Phi(config), jax.jit(init_params, static_argnums=0)(config, jax.random.key(3))


@pytest.mark.slow
def test_tiny_phi_scores_equal_a_direct_forward(tiny_phi):
    model, variables = tiny_phi
    tok = _AsciiTokenizer()
    pairs = [("The capital of France is", " Paris"), ("x = 1 + 1  # one more:", " 2"),
             ("a", "bcdefgh" * 3), ("Question: 2+2? Answer:", " 4")]
    scores = scoring.score_texts(model, variables, tok, pairs, batch_size=3)
    for (ctx, cont), s in zip(pairs, scores):
        ids = tok.encode(ctx + cont)
        logp = _direct_logp(model, variables, ids)
        n = len(cont)
        ref = sum(logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids)))
        greedy = all(logp[t - 1].argmax() == ids[t] for t in range(len(ids) - n, len(ids)))
        assert s.logprob == pytest.approx(float(ref), abs=1e-4) and s.num_tokens == n
        assert s.is_greedy == greedy
    # a continuation built from the model's own argmax is greedy
    ctx = tok.encode("hello world, greedy:")
    ids = list(ctx)
    for _ in range(3):
        ids.append(int(_direct_logp(model, variables, ids)[-1].argmax()))
    (s,) = scoring.score_requests(model, variables, [(ctx, ids[len(ctx):])])
    assert s.is_greedy


def test_left_truncation_keeps_the_continuation(tiny_phi):
    model, variables = tiny_phi
    ctx, cont = list(range(1, 60)), [5, 6, 7]
    (s,) = scoring.score_requests(model, variables, [(ctx, cont)])
    seq = (ctx + cont)[-33:]  # max_len inputs + the last target
    logp = _direct_logp(model, variables, seq[:-1])
    # cont[i] is seq[30 + i], predicted at input position 29 + i
    assert s.logprob == pytest.approx(float(sum(logp[29 + i, cont[i]] for i in range(3))),
                                      abs=1e-4)
    with pytest.raises(ValueError, match="rolling"):
        scoring.score_requests(model, variables, [([1], list(range(40)))])


def test_read_jsonl_validates(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 1}) + "\n\n")
    assert len(choice.read_jsonl(str(good))) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": ["b"], "label": 3}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: label 3"):
        choice.read_jsonl(str(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"context": "a"}) + "\n")
    with pytest.raises(ValueError, match="missing keys"):
        choice.read_jsonl(str(missing))
