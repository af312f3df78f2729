"""phi-2 (2.7B) pretraining: the published shapes, bf16 compute, parameters sharded FSDP-style.

    phi-jax train --config=configs/phi-2.py --workdir=gs://bucket/phi-2 \
        --config.data.source=arrayrecord --config.data.paths='/data/train-*.arrayrecord' \
        --config.tokenizer.path=/models/phi-2          # HF dir with tokenizer.json
    python -m phi_jax.plan --config=configs/phi-2.py --devices 8 64 256   # memory / time plan

Published (microsoft/phi-2 model card): 2.7B parameters, sequence 2048, 1.4T training tokens
(250B-token dataset, several epochs), 96 A100-80G for 14 days. NOT published, assumed here:
global batch 1024 x 2048 tokens (phi-1's), AdamW with phi-1.5's settings (lr 2e-4, betas
0.9/0.98, eps 1e-7, weight decay 0.1), and a 2000-step warmup into cosine decay to 10%
(phi-1.5 used a constant rate; a 1.4T-token run decaying is the usual choice). Dropout 0.1 on
the residual, as in the published config.json. Compute in bfloat16 with float32 master weights
(the Phi models were trained in fp16 with DeepSpeed ZeRO; bf16 needs no loss scaling).
Memory: see the planning table in the README (`benchmarks/plan.py`); full remat is what fits a
16 GiB TPU v5e, so it is the default here. `train.accum_steps` turns the global batch into
micro-batches when rows per device would not fit: batch 1024 on 256 chips is 4 rows per chip.
"""

from phi_jax.training.defaults import base_config, lock

TOKENS = 1.4e12  # published training tokens
SEQ_LEN = 2048
BATCH = 1024  # assumption: not published for phi-2


def get_config(arg: str | None = None):
    c = base_config("phi-2")
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "full"
    c.train.seq_len = SEQ_LEN
    c.train.batch_size = BATCH
    c.train.steps = int(TOKENS // (BATCH * SEQ_LEN))  # 667,572
    c.train.checkpoint_every = 2000
    c.train.log_every = 50
    c.tokenizer.vocab_size = 50295  # only used when no tokenizer.path is given
    o = c.optimizer
    o.lr = 2e-4
    o.warmup_steps = 2000
    o.schedule = "cosine"
    o.min_lr_ratio = 0.1
    o.weight_decay = 0.1
    o.b1, o.b2, o.eps = 0.9, 0.98, 1e-7
    o.grad_clip = 1.0
    c.mesh.shape.update({"data": 1, "fsdp": -1, "tensor": 1})
    c.data.num_workers = 4
    if arg == "runlocal":  # seconds-long CPU smoke run: phi-2's head dim 80 and rotary 0.4, tiny
        c.model.update(vocab_size=512, d_model=160, n_layers=2, n_heads=2, mlp_dim=256, max_len=128,
                       dtype="float32")
        c.tokenizer.vocab_size = 512
        c.train.update(steps=4, batch_size=8, seq_len=32, checkpoint_every=2, log_every=1,
                       progress_bar=False)
        c.optimizer.warmup_steps = 1
        c.data.num_workers = 0
        c.data.max_documents = 64
    return lock(c)
