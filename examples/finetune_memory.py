"""What a LoRA fine-tuning step holds, from XLA's compiled memory analysis (no step is run).

    python examples/finetune_memory.py [--preset=test] [--batch=4] [--seq-len=128]

For each setting of the two knobs (layer remat, LM-head chunking) it compiles the trainer's own
LoRA step and prints XLA's temporaries next to the state it carries: the frozen base, which has no
gradient and no optimizer state, and the adapter's Adam moments. `--preset=smollm2-135m
--batch=4 --seq-len=512` gives the numbers of docs/memory.md (about a minute per setting on a CPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import ml_collections

from phi_jax import lora
from phi_jax.config import preset
from phi_jax.model import Phi, abstract_params
from phi_jax.training.optimizer import make_optimizer
from phi_jax.training.step import init_state, make_train_step

MB = 1024 ** 2


def lora_step_memory(model_preset: str, batch: int, seq_len: int, remat: str, loss_chunk: int) -> dict:
    """XLA's memory analysis of the jitted, donated LoRA step (rank 8 on every linear module)."""
    base = preset(model_preset).replace(scan_layers=True, remat_policy=remat)
    config = lora.with_lora(base, 8, 16.0, sorted(base.lora_target_choices()))
    optimizer = make_optimizer(ml_collections.ConfigDict(
        {"lr": 1e-4, "b1": 0.9, "b2": 0.98, "eps": 1e-7, "weight_decay": 0.0, "grad_clip": 1.0,
         "schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 1.0}), 100, freeze_base=True)
    state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), abstract_params(config)["params"])
    ints = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    data = {"tokens": ints, "targets": ints, "positions": ints, "segment_ids": ints,
            "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)}
    step = make_train_step(Phi(config), optimizer, loss_chunk=loss_chunk, freeze_base=True)
    analysis = jax.jit(step, donate_argnums=0).lower(state, data).compile().memory_analysis()
    adapter, frozen = lora.split_adapter(state["params"])
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / MB
    return {"frozen base": size(frozen), "adapter": size(adapter),
            "optimizer state": size(state["opt_state"]),
            "XLA temporaries": analysis.temp_size_in_bytes / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="test")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    chunk = max(1, args.seq_len // 2)
    print(f"LoRA step of {args.preset} at {args.batch}x{args.seq_len} (MB)")
    for remat, loss_chunk in (("none", 0), ("none", chunk), ("full", 0), ("full", chunk)):
        m = lora_step_memory(args.preset, args.batch, args.seq_len, remat, loss_chunk)
        print(f"remat={remat:<5} loss_chunk={loss_chunk:<4} " +
              "  ".join(f"{k} {v:.1f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
