"""Curation: the data recipe of the Phi papers, as steps over records that runners execute.

One room per job; each room's `__init__` names its modules and entry points. Every stage is a
plain function over records (`core.stage.Stage`) that `core.runners.run_stage` runs over shards,
resumably, writing a manifest; the record schema, shards and manifests are `phi_jax.data.records`.

    core/           stage.py (a stage and one shard), runners/ (`run_stage`: local processes or
                    Apache Beam), templates.py (prompt files and their hash), text.py (the one word
                    rule every room counts words by)
    teacher/        client.py (THE teacher client: any OpenAI-compatible endpoint, concurrent,
                    retried), cache.py (answers on disk before use), heuristic.py (offline stand-in)
    quality/        annotate.py (a teacher's score per record against a rubric), classify.py (a
                    head on embeddings that predicts it, `meta.quality`), filter.py (keep what passes)
    dedup/          remove.py (exact + MinHash-LSH near duplicates), shingles.py, minhash.py,
                    index.py (the whole-corpus passes), beam_buckets.py
    decontaminate/  remove.py (13-gram cuts + code checks), eval_sets.py (what to check against),
                    code_similarity.py (phi-1's AST and embedding distances)
    synthesis/      plan.py (topics x audiences x styles, a pure function of the seed), run.py
                    (generate -> gate -> report), exercises.py (executed in the sandbox),
                    output_gates.py (the gates on the generated set), diversity.py (the report)
    instruct/       run.py (Orca-2: strategy answers, prompt erasure, strategy selection),
                    strategies.py (the system prompts and the leak check), corpus_tasks.py (tasks
                    with checkable answers from the embedded corpus)
    prompts/        package data: rubrics (edu, code), synthesis templates, steering.yaml,
                    strategies/

Rooms import `core`; `core` imports no other room. Chaining stages into a job is
`phi_jax.jobs`' (the main job's curation, the recipe).
Teachers are reached over HTTP only; this package never imports the server.
"""
