"""Train the tiny Phi from Python: the main job (curate the stdlib corpus, then train) as a function.

    python examples/train_tiny.py          # well under a minute on a CPU: a 2-layer model, 3 steps

`phi_jax.jobs.train` is what `phi-jax train` runs; the config is the same file the CLI takes, and
`overrides` are its `--config.x=y` flags as a dict. Calling it again with the same workdir resumes.
"""

import tempfile
from pathlib import Path

from phi_jax.jobs import train

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py") + ":runlocal"

with tempfile.TemporaryDirectory() as workdir:  # or gs://BUCKET/run: everything goes to the bucket
    run = train(CONFIG, workdir=workdir, overrides={"train.steps": 3})
    print(run.table)  # one line per stage: documents and tokens in -> out, time
    print(f"loss {run.losses[0]:.3f} -> {run.final_loss:.3f} after {run.end_step} steps")

    more = train(CONFIG, workdir=workdir, overrides={"train.steps": 5})  # resumes at step 3
    print(f"resumed at step {more.start_step}, now at {more.end_step}; the curation stages were "
          f"{sorted({row['status'] for row in more.stages[:4]})}; checkpoints: {more.paths['checkpoints']}")
