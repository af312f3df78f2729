"""Curation: the data recipe of the Phi papers, as steps over records that runners execute.

    records        phi_jax.data.records: the one record schema ({"id", "text", "meta"}), shards,
                   and the manifest every output directory carries
    stage.py       a stage = a plain step function over batches of records + its parameters;
                   `process_shard` runs one over one shard and publishes it atomically
    runners/       run_stage (plan, resume, manifest, summary); local (processes over shards) and
                   beam (the same stage as an Apache Beam pipeline)
    teacher.py     THE teacher client: any OpenAI-compatible endpoint, concurrency, retries,
                   an on-disk cache written before an answer is used (teacher_cache.py)
    annotate.py    rubric prompts (prompts/*.txt) -> a teacher's score per record
    heuristic.py   an offline stand-in teacher, computed from the text itself
    classify.py    embeddings -> a quality head (ridge / logistic / forest), `meta.quality`
    filter.py      keep what passes a threshold, count what does not
    dedup.py, decontaminate.py  near duplicates (MinHash-LSH); benchmark n-grams and code
    seeds.py       synthesis plans: topics x audiences x styles, scheduled to a target mix, a pure
                   function of the seed (prompt templates and steering in prompts/)
    synthesize.py  textbook sections and exercises from a teacher; exercises.py cuts an exercise
                   into prompt / solution / check and keeps it only if it passes in the sandbox
    gates.py       duplicates and benchmark overlap dropped, repetition flagged (whole-set)
    diversity.py   the diversity report of a synthesis run (JSON + PNG)
    strategies.py  Orca-2 strategy prompt files (prompts/strategies/), the type -> strategy map,
                   the 13-word leak check
    instruct.py    Orca-2 instruction data: strategy answers stored under a generic system
                   message; strategy selection on a dev split
    corpus_tasks.py  tasks with checkable references from the embedded corpus

Teachers are reached over HTTP only; this package never imports the server.
"""
