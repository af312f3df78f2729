"""The main job: a ~7M-parameter Phi trained on the embedded stdlib corpus in minutes on 2 CPU cores.

    phi-jax train --config=configs/tiny.py --workdir=runs/tiny
    phi-jax train --config=configs/tiny.py --workdir=runs/tiny --config.train.steps=50
"""

from phi_jax.train.defaults import base_config, lock


def get_config(arg: str | None = None):
    c = base_config("tiny")
    c.train.steps = 300
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 30
    if arg == "runlocal":  # seconds-long smoke run (tests): a 2-layer model, 512-token BPE
        c.model.update(d_model=64, n_layers=2, n_heads=4, mlp_dim=128, vocab_size=512, max_len=128)
        c.train.steps = 6
        c.train.batch_size = 8
        c.train.seq_len = 32
        c.train.checkpoint_every = 2
        c.train.log_every = 1
        c.train.progress_bar = False
        c.data.max_documents = 64
        c.tokenizer.vocab_size = 512
        c.optimizer.warmup_steps = 2
    return lock(c)
