"""The main job: a ~7M-parameter Phi trained on the curated stdlib corpus in minutes on 2 CPU cores.

    phi-jax train --config=configs/tiny.py --workdir=runs/tiny
    phi-jax train --config=configs/tiny.py --workdir=runs/tiny --config.train.steps=50
    phi-jax train --config=configs/tiny.py --workdir=runs/raw --config.curation.enabled=False

The corpus is curated first (WORKDIR/curated/<stage>, each with a manifest; skipped on a rerun):
the offline heuristic annotator scores code with the `code` rubric and the language reference with
`edu`, records scoring below 3 are dropped, then near duplicates, then anything overlapping HumanEval.
"""

from phi_jax.training.defaults import base_config, lock


def get_config(arg: str | None = None):
    c = base_config("tiny")
    c.train.steps = 300
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    # Four layers unrolled instead of scanned: on XLA:CPU the scan slices stacked weights and
    # stacks activations every step (~10 % of this step, benchmarks/results/train_step*.json);
    # at this depth compiling four layers costs seconds. Deep models on accelerators keep the scan.
    c.model.scan_layers = False
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 30
    c.curation.enabled = True
    c.curation.sources = "default"  # its rubrics suit the stdlib corpus: code by `code`, prose by `edu`
    c.curation.filter.min_score = 3.0
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
        c.curation.shard_size = 16  # several shards, so resume is per shard as at scale
    return lock(c)
