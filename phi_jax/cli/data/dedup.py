r"""`phi-jax data dedup`: remove exact and near-duplicate documents, keeping one per cluster.

    phi-jax data dedup --input='crawl/*.jsonl' --output=out/dedup --threshold=0.8
    phi-jax data dedup --input=out/kept --output=out/dedup --unit=char --ngram=24 --runner=beam

Texts are normalised (ASCII lowercase, punctuation deleted, whitespace collapsed), cut into word
5-grams (--unit/--ngram) and MinHashed; documents sharing an LSH band (bands x rows chosen from
--threshold, the S-curve printed first) or an equal normalised text are linked, and of each
connected cluster the first document in input order is kept. OUTPUT holds the kept records
(unchanged), manifest.json, and clusters.jsonl: one line per cluster, the kept document and each
removed one with why (exact / near) and its estimated Jaccard similarity to the kept one.
The whole-corpus passes keep their files in OUTPUT/.work (removed at the end): a killed run,
rerun with the same command, resumes where it stopped.
"""

from __future__ import annotations

import argparse

from phi_jax.cli.data.common import add_run_arguments, run


def register(sub) -> None:
    p = sub.add_parser("dedup", help="remove exact and MinHash near-duplicate documents",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--threshold", type=float, default=0.8,
                   help="Jaccard similarity of shingle sets above which documents are near duplicates")
    p.add_argument("--ngram", type=int, default=5, help="units per shingle (5 words; e.g. 24 for --unit=char)")
    p.add_argument("--unit", default="word", choices=["word", "char"], help="shingle unit")
    p.add_argument("--num-perm", type=int, default=256, help="MinHash permutations (bands x rows <= this)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MinHash permutations")
    p.add_argument("--fp-weight", type=float, default=0.2,
                   help="weight of the S-curve's false-positive area when choosing bands x rows")
    p.add_argument("--fn-weight", type=float, default=0.8,
                   help="weight of the S-curve's false-negative area (missed duplicates)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from phi_jax.curation.dedup.remove import DedupConfig, dedup_stage

    options = dict(ngram=args.ngram, unit=args.unit, num_perm=args.num_perm, seed=args.seed,
                   fp_weight=args.fp_weight, fn_weight=args.fn_weight)
    print(DedupConfig(args.threshold, **options).lsh.describe(), flush=True)
    return run(args, dedup_stage(args.threshold, **options))
