"""The machinery every curation room runs on: stages, runners, prompt templates, the word rule.

    stage.py       a stage = a plain step function over batches of records + its parameters
                   (`Stage`, `Counts`, `PlannedInputs`); `process_shard` runs one over one shard
                   and publishes it atomically
    runners/       `run_stage(stage, inputs, output, runner="local" | "beam")`: plan, resume,
                   manifest, `summary`; local.py (processes over shards), beam.py (Apache Beam)
    templates.py   prompt files: `load_template`, `PromptTemplate`, `template_sha256` (the hash that
                   keys the teacher's answer cache); the built-in files are package data in
                   `phi_jax/curation/prompts/`
    text.py        `words`, `normalize`, `word_spans`: curation's one word rule (lm-eval's janitor's),
                   used by dedup shingles, decontamination, the synthesis gates and the leak check

The record schema, shards and manifests are `phi_jax.data.records`. Nothing here imports another
curation room; every room builds on this one. Chaining stages into a job (the main job's
annotate -> filter -> dedup -> decontaminate) is `phi_jax.jobs.curate`'s.
"""
