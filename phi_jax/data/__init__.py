"""Data for phi_jax: the embedded default corpus and the Grain input pipeline.

Modules: `corpus` (the stdlib corpus, its hash, the cached BPE tokenizer), `sources` (text, JSONL,
ArrayRecord, tfds readers), `documents` (parsing, tokenizing, bad-data policy), `packing`
(first-fit packing, targets, loss mask), `pipeline` (the entry point: `build_dataset`), `records`
(the curation record schema, shards, manifests), `tasks` (instruction tasks, their splits and the
instruction-example schema with GENERIC_SYSTEM_MESSAGE) and `answers` (scoring free-text answers
against references).
"""
