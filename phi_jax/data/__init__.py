"""Data for phi_jax: the embedded default corpus and the Grain input pipeline.

Modules: `corpus` (the stdlib corpus, its hash, the cached BPE tokenizer), `sources` (text, JSONL,
ArrayRecord, tfds readers), `documents` (parsing, tokenizing, bad-data policy), `packing`
(first-fit packing, targets, loss mask) and `pipeline` (the entry point: `build_dataset`).
"""
