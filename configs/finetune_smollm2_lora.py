"""LoRA instruction tuning of SmolLM2-135M-Instruct on a CPU (README: Orca-2 instruction tuning).

    phi-jax finetune --config=configs/finetune_smollm2_lora.py --model=smollm2 \
        --data=runs/instruct --workdir=runs/ft-lora [--merge=runs/ft-merged]
    phi-jax finetune --config=configs/finetune_smollm2_lora.py:runlocal ...   # seconds (tests)

The model's shape, tokenizer and chat template come from --model; of `model.*` only the compute
settings (dtype, remat_policy, attention_impl, ...) are read. Rank 8 on every linear layer of the
blocks (2.44M trainable parameters, 1.8 % of 135M); --config.lora.rank=0 fine-tunes everything.
"""

from phi_jax.training.defaults import base_config, lock


def get_config(arg: str | None = None):
    c = base_config("tiny")
    c.train.steps = 12  # ~1 epoch of ~100 short conversations: minutes on a loaded 2-core CPU
    c.train.batch_size = 2
    c.train.seq_len = 512  # several conversations (task + answer) per packed row
    c.train.loss_chunk = 256  # the 49k-vocabulary head one chunk at a time
    # Recompute each layer's activations in the backward pass: the LoRA step's XLA temporaries
    # fall from 5.6 to 0.64 GB at 4x512 (docs/memory.md, benchmarks/memory.py)
    c.model.remat_policy = "full"
    c.train.checkpoint_every = 6
    c.train.log_every = 2
    c.train.eval_batches = 1
    c.data.heldout_fraction = 0.05
    c.data.long_documents = "skip"  # a conversation cut in two teaches half an answer
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 2
    c.optimizer.weight_decay = 0.0
    c.optimizer.min_lr_ratio = 0.1
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    if arg == "runlocal":  # seconds-long smoke run on a tiny base (tests); Phi-family targets
        c.train.steps = 4
        c.train.batch_size = 8
        c.train.seq_len = 64
        c.train.checkpoint_every = 2
        c.train.log_every = 1
        c.train.eval_batches = 1
        c.train.progress_bar = False
        c.data.heldout_fraction = 0.0
        c.data.long_documents = "split"
        c.optimizer.warmup_steps = 1
        c.optimizer.lr = 1e-2
        c.lora.targets = "q_proj,v_proj,fc1"
    return lock(c)
