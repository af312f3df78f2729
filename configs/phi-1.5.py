"""phi-1.5 (1.3B) pretraining: published shapes and the phi-1.5 report's optimizer settings.

    phi-jax train --config=configs/phi-1.5.py --workdir=DIR \
        --config.data.source=arrayrecord --config.data.paths='/data/train-*.arrayrecord' \
        --config.tokenizer.path=/models/phi-1_5

From "Textbooks Are All You Need II" (phi-1.5 technical report, section 2.3): random init,
constant learning rate 2e-4 with no warmup, weight decay 0.1, Adam with betas 0.9/0.98 and eps
1e-7, fp16 with DeepSpeed ZeRO-2, batch size 2048 sequences of 2048 tokens, 150B tokens.
(The issue text says batch 1024; the report as I read it says 2048. Check before a real run;
it is one override: --config.train.batch_size=1024.) Gradient clipping is not stated: 1.0 is an
assumption. Compute in bfloat16 with float32 master weights instead of fp16 (no loss scaling).
"""

from phi_jax.training.defaults import base_config, lock

TOKENS = 150e9
SEQ_LEN = 2048
BATCH = 2048


def get_config(arg: str | None = None):
    c = base_config("phi-1.5")
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "full"
    c.train.seq_len = SEQ_LEN
    c.train.batch_size = BATCH
    c.train.steps = int(TOKENS // (BATCH * SEQ_LEN))  # 35,762
    c.train.checkpoint_every = 1000
    c.train.log_every = 50
    c.tokenizer.vocab_size = 50295  # only used when no tokenizer.path is given
    o = c.optimizer
    o.lr = 2e-4
    o.warmup_steps = 0
    o.schedule = "constant"
    o.weight_decay = 0.1
    o.b1, o.b2, o.eps = 0.9, 0.98, 1e-7
    o.grad_clip = 1.0
    c.mesh.shape.update({"data": 1, "fsdp": -1, "tensor": 1})
    c.data.num_workers = 4
    if arg == "runlocal":  # seconds-long CPU smoke run with phi-1.5's proportions, tiny
        c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, mlp_dim=256, max_len=128,
                       dtype="float32")
        c.tokenizer.vocab_size = 512
        c.train.update(steps=4, batch_size=8, seq_len=32, checkpoint_every=2, log_every=1,
                       progress_bar=False)
        c.data.num_workers = 0
        c.data.max_documents = 64
    return lock(c)
