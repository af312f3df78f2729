"""`phi-jax data score`: add meta.quality, a trained classifier's predicted score (0-5), to every record.

    phi-jax data score --input=default --classifier=out/clf --output=out/scored

The embedder is the model the classifier was trained with (recorded in its classifier.json);
--embedder overrides it (same hidden size required). Use --workers=1 unless the machine has the
memory for one model per worker.
"""

from __future__ import annotations

import argparse

from phi_jax.cli.data.common import add_run_arguments, run


def register(sub) -> None:
    p = sub.add_parser("score", help="add meta.quality from a trained quality classifier",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--classifier", required=True, help="output directory of `phi-jax data train-classifier`")
    p.add_argument("--embedder", default=None, help="model path overriding the classifier's embedder")
    p.add_argument("--embed-batch-size", type=int, default=16, help="texts per device call")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from phi_jax.curation.quality.classify import score_stage

    return run(args, score_stage(args.classifier, embedder=args.embedder, batch_size=args.embed_batch_size))
