"""Every key a training config may set, with its default.

`configs/*.py` start from `base_config(preset)` and override; the returned ConfigDict is locked, so
an override of a key that does not exist (a typo) is an error that names the key.
"""

from __future__ import annotations

import ml_collections

from phi_jax import axes
from phi_jax.config import preset


def base_config(model_preset: str = "tiny") -> ml_collections.ConfigDict:
    from phi_jax.data.pipeline import default_data_config

    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(preset(model_preset).to_dict())

    c.data = default_data_config()
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # a tokenizer dir/file; "" = byte-level BPE trained on the default corpus
    c.tokenizer.vocab_size = 8192  # for the trained BPE

    t = c.train = ml_collections.ConfigDict()
    t.steps = 1000
    t.batch_size = 16  # global, across hosts and accumulation
    t.seq_len = 256
    t.seed = 0
    t.accum_steps = 1
    t.checkpoint_every = 200
    t.max_to_keep = 3
    t.async_checkpoint = True
    t.log_every = 10
    t.max_nonfinite_streak = 5  # stop after this many skipped (NaN/inf) steps in a row
    t.stop_at_step = 0  # >0: checkpoint and stop once this step is done (time-sliced jobs)
    t.loss_chunk = 0  # >0: LM head + loss over chunks of this many positions (saves [B,T,V] memory)
    t.eval_every = 0  # held-out loss every N steps (0 = at each checkpoint) and at the end
    t.eval_batches = 8  # batches of the held-out split per evaluation (0 = no held-out eval)
    t.init_from_hf = ""  # start from an HF checkpoint dir (fine-tuning)
    t.peak_flops_per_device = 0.0  # 0 = from the device table (MFU omitted if unknown)
    t.progress_bar = True

    o = c.optimizer = ml_collections.ConfigDict()
    o.lr = 1e-3
    o.warmup_steps = 100
    o.schedule = "cosine"  # cosine | linear | constant
    o.min_lr_ratio = 0.1
    o.weight_decay = 0.1
    o.b1 = 0.9
    o.b2 = 0.98
    o.eps = 1e-7
    o.grad_clip = 1.0

    lo = c.lora = ml_collections.ConfigDict()
    lo.rank = 0  # > 0: train only a LoRA adapter of this rank on lora.targets (phi_jax.lora)
    lo.alpha = 16.0  # the adapter's output is scaled by alpha / rank (PEFT's lora_alpha)
    lo.targets = "q_proj,v_proj"  # HF module names, comma-separated (PEFT's target_modules)

    m = c.mesh = ml_collections.ConfigDict()
    m.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Logical axis -> mesh axes, one key per name so the command line can set it:
    # "default" (phi_jax.sharding.DEFAULT_RULES), "fsdp", "fsdp,tensor", or "none" (replicated);
    # e.g. --config.mesh.rules.embed=fsdp,tensor --config.mesh.rules.mlp=none
    m.rules = ml_collections.ConfigDict({name: "default" for name in axes.ALL})
    c.curation = curation_config()
    return c


def curation_config() -> ml_collections.ConfigDict:
    """The stages `phi-jax train` runs over `data.*` before training (off unless a config turns it on).

    Each stage is a `phi-jax data` stage (the same function), its output a directory with a manifest
    under WORKDIR/curated/<stage>; a stage switched off is passed over and the next reads its input.
    """
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.sources = "default,text,jsonl,arrayrecord"  # the data.source values curated; others train as given
    c.runner = "local"  # local | beam (the same stages as an Apache Beam pipeline)
    c.workers = 1  # local worker processes (1 = in this process) or Beam DirectRunner workers
    c.beam_options = ""  # e.g. "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/t"
    c.shard_size = 1000  # records per shard: the unit of resume
    a = c.annotate = ml_collections.ConfigDict()
    a.enabled = True
    a.teacher = "heuristic"  # "heuristic" (offline, from the text itself) or an OpenAI-compatible URL
    a.teacher_model = ""
    a.concurrency = 8
    a.rubric = "code"  # code | edu | a prompt file with {text}
    a.prose_rubric = "edu"  # the rubric of prose records (meta.kind == "prose"); "" = `rubric` for all
    a.max_chars = 4000
    f = c.filter = ml_collections.ConfigDict()
    f.enabled = True
    f.field = "annotation.score"  # the meta field compared (annotation.score, or quality from a classifier)
    f.min_score = 3.0  # keep records whose field is >= this (0-5)
    d = c.dedup = ml_collections.ConfigDict()
    d.enabled = True
    d.threshold = 0.8  # MinHash-LSH Jaccard similarity that makes a near duplicate
    d.ngram = 5  # words per shingle
    x = c.decontaminate = ml_collections.ConfigDict()
    x.enabled = True
    x.against = "humaneval"  # comma-separated evaluation sets (humaneval, FILE.jsonl[:FIELD])
    x.ngram = 13
    x.code_check = True  # also drop documents with a function AST-similar to a benchmark solution
    return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.lock()
    return config
