"""Perplexity: equal to transformers' loss for the same weights, exact token accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import phi_jax
from phi_jax.evals import perplexity
from phi_jax.tokenizer import train_bpe

VOCAB, MAX_LEN = 300, 64
CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
          "import os\nprint(os.getcwd())\n", "Perplexity is the exponential of the mean loss."]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random tiny HF PhiForCausalLM saved as safetensors, and phi_jax's load of that dir."""
    cfg = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=MAX_LEN, partial_rotary_factor=0.5,
                                 attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.PhiForCausalLM(cfg).eval()
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.copy_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_phi")
    hf.save_pretrained(path, safe_serialization=True)
    model, variables = phi_jax.from_pretrained(path)
    return hf, model, variables


def _hf_nll(hf, ids) -> float:
    """transformers' mean loss over a document times its number of predictions."""
    with torch.no_grad():
        t = torch.tensor([list(ids)])
        return hf(t, labels=t).loss.item() * (len(ids) - 1)


@pytest.mark.slow
def test_packed_documents_equal_transformers_loss(hf_pair):
    hf, model, variables = hf_pair
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, n).tolist() for n in (40, 7, 64, 17, 1)]
    res = perplexity.evaluate_token_lists(model, variables, docs, row_len=MAX_LEN, batch_size=2)
    expected = sum(_hf_nll(hf, d) for d in docs if len(d) > 1)
    assert res.num_tokens == 39 + 6 + 63 + 16  # the 1-token document predicts nothing
    assert res.nll == pytest.approx(expected, rel=1e-5)
    assert res.loss == pytest.approx(expected / res.num_tokens, rel=1e-5)
    assert res.perplexity == pytest.approx(np.exp(expected / res.num_tokens), rel=1e-5)
    # one text alone: exactly transformers' loss
    one = perplexity.evaluate_token_lists(model, variables, [docs[0]], row_len=MAX_LEN)
    with torch.no_grad():
        t = torch.tensor([docs[0]])
        assert one.loss == pytest.approx(hf(t, labels=t).loss.item(), rel=1e-5)


def test_long_document_chunks_overlap_by_one_token(hf_pair):
    hf, model, variables = hf_pair
    doc = np.random.default_rng(1).integers(0, VOCAB, 150).tolist()
    res = perplexity.evaluate_token_lists(model, variables, [doc], row_len=MAX_LEN, batch_size=2)
    assert res.num_tokens == 149  # every token but the first predicted exactly once
    chunks = [doc[0:64], doc[63:127], doc[126:150]]
    assert sum(len(c) - 1 for c in chunks) == 149
    assert res.nll == pytest.approx(sum(_hf_nll(hf, c) for c in chunks), rel=1e-5)


def test_texts_with_a_tokenizer_equal_transformers(hf_pair):
    hf, model, variables = hf_pair
    tok = train_bpe(CORPUS * 4, vocab_size=VOCAB)
    res = perplexity.evaluate_texts(model, variables, tok, CORPUS, row_len=MAX_LEN)
    ids = [tok.encode(t) for t in CORPUS]
    assert all(len(i) <= MAX_LEN for i in ids)
    assert res.num_tokens == sum(len(i) - 1 for i in ids) and res.num_documents == 4
    assert res.nll == pytest.approx(sum(_hf_nll(hf, i) for i in ids), rel=1e-5)


def test_pipeline_batches_count_every_target_once(hf_pair, tmp_path):
    """Through phi_jax.data.pipeline (which appends EOS to each document): the same sums as
    packing the EOS-terminated token lists here."""
    hf, model, variables = hf_pair
    tok = train_bpe(CORPUS * 4, vocab_size=VOCAB)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    batches = perplexity.dataset_batches({"source": "jsonl", "paths": str(data)}, tok,
                                         seq_len=MAX_LEN, batch_size=2)
    res = perplexity.evaluate_batches(model, variables, batches)
    docs = [tok.encode(t) + [tok.eos_id] for t in CORPUS]
    assert res.num_tokens == sum(len(d) - 1 for d in docs)
    assert res.nll == pytest.approx(sum(_hf_nll(hf, d) for d in docs), rel=1e-5)


def test_pack_documents_layout():
    rng = np.random.default_rng(2)
    docs = [rng.integers(1, 50, n).tolist() for n in rng.integers(1, 40, 30)] + [list(range(1, 91))]
    batches = list(perplexity.pack_documents(docs, row_len=32, batch_size=3))
    mask = sum(b["loss_mask"].sum() for b in batches)
    assert mask == sum(len(d) - 1 for d in docs if len(d) > 1)
    for b in batches:
        seg, tok, tgt, pos = b["segment_ids"], b["tokens"], b["targets"], b["positions"]
        valid = b["loss_mask"] > 0
        # a target is always the next token of the same segment
        assert np.all(seg[:, :-1][valid[:, :-1]] == seg[:, 1:][valid[:, :-1]])
        assert np.all(tgt[:, :-1][valid[:, :-1]] == tok[:, 1:][valid[:, :-1]])
        assert not valid[:, -1].any() and not valid[seg == 0].any()
        for r in range(seg.shape[0]):
            for s in set(seg[r]) - {0}:
                assert np.array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
    with pytest.raises(ValueError, match="row_len"):
        list(perplexity.pack_documents(docs, row_len=1, batch_size=1))
