"""Fine-tuning: the chat loss mask, LoRA against PEFT on transformers, merging, the finetune CLI
(adapter, --merge, --adapter loading) and exact resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phi_jax
from phi_jax import lora
from phi_jax.chat import render_chat
from phi_jax.config import preset
from phi_jax.data import pipeline
from phi_jax.model import Phi, init_params
from phi_jax.tokenizer import train_bpe

from train_helpers import ROOT, params_equal

IM = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
FINETUNE = str(ROOT / "configs" / "finetune_smollm2_lora.py") + ":runlocal"
# A Llama-3-style template: another layout of turns and another end-of-turn marker.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _conversations(n: int = 24, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    words = ["def", "return", "value", "list", "the", "function", "sorted", "len", "(x)", "é", "42"]
    say = lambda k: " ".join(rng.choice(words, k))
    out = []
    for i in range(n):
        turns = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(1 + i % 2):  # one or two exchanges
            turns += [{"role": "user", "content": f"Q{i}: {say(6)}?"},
                      {"role": "assistant", "content": f"A{i}: {say(3 + i % 5)}."}]
        out.append(turns)
    return out


def _write_chat(path: Path, conversations) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "part-00000.jsonl", "w") as f:
        for i, messages in enumerate(conversations):
            f.write(json.dumps({"id": f"c{i}", "text": messages[1]["content"],
                                "meta": {"messages": messages, "split": "train"}}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    texts = [render_chat(c, None, bos_token="", eos_token="", add_generation_prompt=False)
             for c in _conversations(64)]
    return train_bpe(texts * 4, vocab_size=400, special_tokens=IM)


# ----------------------------------------------------------------------------- the chat loss mask
@pytest.mark.parametrize("template", [None, LLAMA3_TEMPLATE], ids=["chatml", "llama3"])
def test_packed_loss_mask_covers_exactly_the_assistant_tokens(tokenizer, template, tmp_path):
    conversations = _conversations()
    data = _write_chat(tmp_path / "chat", conversations)
    cfg = {"source": "jsonl", "paths": str(data / "part-00000.jsonl"), "messages_field": "messages",
           "shuffle": False, "num_epochs": 1, "drop_remainder": False, "heldout_fraction": 0.0}
    if template:
        (tmp_path / "t.jinja").write_text(template)
        cfg["chat_template"] = str(tmp_path / "t.jinja")
    end = "<|eot_id|>" if template else "<|im_end|>"
    special = tokenizer.special_tokens_map
    rendered = {render_chat(c, template, add_generation_prompt=False, **special): c for c in conversations}
    seen = []
    for batch in pipeline.build_dataset(cfg, tokenizer, seq_len=256, batch_size=4):
        for row in range(batch["tokens"].shape[0]):
            segments = batch["segment_ids"][row]
            for seg in set(segments.tolist()) - {0}:
                idx = np.flatnonzero(segments == seg)
                tokens = batch["tokens"][row, idx].tolist()
                # token t+1 is trained exactly when loss_mask[t] is 1 (targets are shifted)
                trained = [False] + [bool(batch["loss_mask"][row, t]) for t in idx[:-1]]
                assert batch["loss_mask"][row, idx[-1]] == 0  # nothing past the segment
                text = tokenizer.decode(tokens, skip_special_tokens=False)
                assert text in rendered, text[:200]  # the template's rendering, token for token
                runs, current = [], []
                for token, on in zip(tokens, trained):
                    if on:
                        current.append(token)
                    elif current:
                        runs.append(current)
                        current = []
                runs += [current] if current else []
                answers = [m["content"] + end for m in rendered[text] if m["role"] == "assistant"]
                assert [tokenizer.decode(r, skip_special_tokens=False) for r in runs] == answers
                seen.append(text)
    assert sorted(seen) == sorted(rendered)  # every conversation once, none cut or lost


def test_a_record_without_a_conversation_is_named(tokenizer, tmp_path):
    from phi_jax.data.documents import BadDataError

    (tmp_path / "x.jsonl").write_text(json.dumps({"id": "r1", "text": "plain", "meta": {}}) + "\n")
    cfg = {"source": "jsonl", "paths": str(tmp_path / "x.jsonl"), "messages_field": "messages",
           "heldout_fraction": 0.0}
    with pytest.raises(BadDataError, match=r"x\.jsonl:1: record has no 'messages' conversation"):
        next(iter(pipeline.build_dataset(cfg, tokenizer, seq_len=64, batch_size=1)))


# ------------------------------------------------------------------------- LoRA against PEFT
def _random_adapter(config, variables, seed=1):
    """Fresh adapter leaves, with B made non-zero so the adapter changes the logits."""
    variables = lora.add_lora_params(config, variables, jax.random.key(seed))
    key = jax.random.key(seed + 1)

    def perturb(path, x):
        if path[-1].key != "lora_b":
            return x
        k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF)
        return 0.05 * jax.random.normal(k, x.shape, x.dtype)

    return {"params": jax.tree_util.tree_map_with_path(perturb, variables["params"])}


@pytest.mark.parametrize("name", ["test-llama", "test-gqa"])
def test_lora_adapter_logits_equal_peft_on_transformers_and_merge_is_exact(name, tmp_path):
    import peft
    import torch
    import transformers

    from hf_reference import hf_logits, random_hf_model

    config = preset(name)
    ref = random_hf_model(config, seed=2)
    ref.save_pretrained(tmp_path / "base")
    model, variables = phi_jax.from_pretrained(tmp_path / "base")
    targets = config.lora_target_choices()
    lora_config = lora.with_lora(config, 4, 8.0, targets)
    tuned = _random_adapter(lora_config, variables)
    lora.save_adapter(tmp_path / "adapter", lora_config, tuned)

    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    ours = np.asarray(Phi(lora_config).apply(tuned, tokens)[0])
    assert np.abs(ours - np.asarray(model.apply(variables, tokens)[0])).max() > 1e-3  # it does something
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    diff = np.abs(ours - hf_logits(peft_model, tokens)).max()
    print(f"{name}: LoRA logits vs peft max abs diff {diff:.2e}")
    assert diff <= 1e-4

    # loading the adapter back (scanned and unstacked layouts) gives the same model
    m2, v2 = phi_jax.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(m2.apply(v2, tokens)[0]), ours, atol=1e-6)
    m3, v3 = phi_jax.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter", scan_layers=False)
    np.testing.assert_allclose(np.asarray(m3.apply(v3, tokens)[0]), ours, atol=1e-5)

    # merged == base + adapter: the same kernels as PEFT's merge, a plain model transformers loads
    lora.save_merged(tmp_path / "merged", lora_config, tuned)
    merged_ref = peft_model.merge_and_unload()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32, attn_implementation="eager").eval()
    theirs = merged_ref.state_dict()
    for key, value in reloaded.state_dict().items():
        np.testing.assert_allclose(value.numpy(), theirs[key].numpy(), atol=1e-6, err_msg=key)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ours, atol=1e-4)
    merged_config, merged_vars = lora.merge(lora_config, tuned)
    assert merged_config == config
    np.testing.assert_allclose(np.asarray(Phi(merged_config).apply(merged_vars, tokens)[0]), ours,
                               atol=1e-5)


def test_bad_adapters_are_named(tmp_path):
    config = preset("test-llama")
    variables = init_params(config, jax.random.key(0))
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json in .*; --adapter must be"):
        lora.load_adapter(tmp_path, config, variables)
    lora_config = lora.with_lora(config, 2, 4.0, ["q_proj"])
    lora.save_adapter(tmp_path / "a", lora_config, lora.add_lora_params(lora_config, variables,
                                                                       jax.random.key(1)))
    other = preset("test-llama", n_layers=3)
    with pytest.raises(ValueError, match=r"does not match its adapter_config\.json and this base model"):
        lora.load_adapter(tmp_path / "a", other, init_params(other, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"lora_targets: unknown module\(s\) \['fc1'\] for a llama model"):
        lora.with_lora(config, 2, 4.0, ["fc1"])


def test_lora_training_moves_only_the_adapter():
    """The frozen base gets a zero update; the adapter's leaves train (optax multi_transform)."""
    from phi_jax.training.defaults import base_config
    from phi_jax.training.optimizer import make_optimizer
    from phi_jax.training.step import init_state, make_train_step

    config = lora.with_lora(preset("test"), 4, 8.0, ["q_proj", "fc2"])
    variables = lora.add_lora_params(config, init_params(preset("test"), jax.random.key(0)),
                                     jax.random.key(1))
    cfg = base_config("test").optimizer
    cfg.warmup_steps = 0
    optimizer = make_optimizer(cfg, 10, freeze_base=True)
    state = init_state(variables["params"], optimizer, 0)
    step = jax.jit(make_train_step(Phi(config), optimizer, freeze_base=True))
    tokens = np.random.default_rng(0).integers(0, 128, (2, 16)).astype(np.int32)
    batch = {"tokens": tokens, "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
             "segment_ids": np.ones_like(tokens), "targets": np.roll(tokens, -1, 1),
             "loss_mask": np.ones(tokens.shape, np.float32)}
    new, _ = step(state, batch)
    new, metrics = step(new, batch)
    mask = lora.trainable_mask(state["params"])
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["params"], new["params"])
    assert jax.tree.leaves(moved) == jax.tree.leaves(mask)  # exactly the adapter moved
    assert metrics["loss"] > 0


# ------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("finetune")
    config = preset("test", vocab_size=tokenizer.vocab_size, max_len=128, eos_token_id=tokenizer.eos_id,
                    bos_token_id=tokenizer.bos_id)
    phi_jax.save_pretrained(root / "base", config, init_params(config, jax.random.key(0)))
    tokenizer.save(root / "base")
    _write_chat(root / "chat", _conversations(24))
    return root / "base", root / "chat"


def _finetune(workdir, base, data, *extra, faults=None, in_process=False):
    argv = ["finetune", f"--config={FINETUNE}", f"--model={base}", f"--data={data}",
            f"--workdir={workdir}", *extra]
    if in_process:
        from phi_jax.cli import main

        assert main(argv) == 0
        return None
    env = dict(os.environ, **({"PHI_JAX_FAULTS": json.dumps(faults)} if faults else {}))
    return subprocess.run([sys.executable, "-m", "phi_jax.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(base_and_data, tmp_path_factory):
    base, data = base_and_data
    workdir = tmp_path_factory.mktemp("ft_straight")
    merged = workdir.parent / (workdir.name + "-merged")
    _finetune(workdir, base, data, f"--merge={merged}", in_process=True)
    return workdir, merged


def test_finetune_writes_a_peft_adapter_and_a_merged_model(base_and_data, straight):
    import peft
    import torch
    import transformers

    from hf_reference import hf_logits
    from phi_jax import checkpoint
    from phi_jax.inference import loader

    base, _ = base_and_data
    workdir, merged = straight
    config, variables, step = checkpoint.load_params_for_inference(workdir)
    assert step == 4 and config.lora_rank == 8 and config.lora_targets == ("q_proj", "v_proj", "fc1")
    _, base_vars = phi_jax.from_pretrained(base)
    assert params_equal(lora.base_params(variables)["params"], base_vars["params"])  # frozen
    b_leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(variables["params"])
                if path[-1].key == "lora_b"]
    assert len(b_leaves) == 3 and all(float(jnp.abs(x).max()) > 0 for x in b_leaves)  # B trained

    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    tuned = loader.load(workdir)
    ours = np.asarray(tuned.model.apply(tuned.variables, tokens)[0])
    with_adapter = loader.load(base, adapter=workdir / "adapter")
    np.testing.assert_allclose(np.asarray(with_adapter.model.apply(with_adapter.variables, tokens)[0]),
                               ours, atol=1e-5)
    ref = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    peft_model = peft.PeftModel.from_pretrained(ref, workdir / "adapter").eval()
    np.testing.assert_allclose(hf_logits(peft_model, tokens), ours, atol=1e-4)
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(
        merged, dtype=torch.float32, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(hf_merged, tokens), ours, atol=1e-4)
    assert (merged / "tokenizer.json").is_file()
    # `phi-jax convert --adapter` writes the same merged weights
    from phi_jax.cli import main

    converted = workdir.parent / "converted"
    assert main(["convert", f"--adapter={workdir / 'adapter'}", str(base), str(converted)]) == 0
    plain = loader.load(converted)
    assert plain.model.config.lora_rank == 0
    np.testing.assert_allclose(np.asarray(plain.model.apply(plain.variables, tokens)[0]), ours, atol=1e-5)


@pytest.mark.slow
def test_finetune_killed_mid_save_resumes_exactly(base_and_data, straight, tmp_path):
    from phi_jax import checkpoint

    base, data = base_and_data
    killed = _finetune(tmp_path, base, data, faults={"kill_after_save_start": 2})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "adapter").exists()
    resumed = _finetune(tmp_path, base, data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["start_step"] in (0, 2) and result["end_step"] == 4
    assert params_equal(checkpoint.load_params_for_inference(tmp_path)[1],
                        checkpoint.load_params_for_inference(straight[0])[1])
    for name in (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS):
        assert (tmp_path / "adapter" / name).read_bytes() == (straight[0] / "adapter" / name).read_bytes()


def test_full_finetune_trains_every_weight_and_merges_to_itself(base_and_data, tmp_path):
    from phi_jax import checkpoint

    base, data = base_and_data
    _finetune(tmp_path / "run", base, data, "--config.lora.rank=0", f"--merge={tmp_path / 'hf'}",
              in_process=True)
    config, variables, _ = checkpoint.load_params_for_inference(tmp_path / "run")
    assert config.lora_rank == 0 and not (tmp_path / "run" / "adapter").exists()
    _, base_vars = phi_jax.from_pretrained(base)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["params"], base_vars["params"])
    assert all(jax.tree.leaves(moved))  # every weight trained
    _, exported = phi_jax.from_pretrained(tmp_path / "hf")
    assert params_equal(exported["params"], variables["params"])
