"""`phi-jax data train-classifier`: a quality head on a model's embeddings, fit to the teacher's scores.

    phi-jax data train-classifier --annotations=out/ann --embedder=runs/tiny --head=ridge --output=out/clf
    phi-jax data train-classifier --annotations=out/a1,out/a2 --embedder=model.gguf --head=forest ...

Embeddings are the mean of the model's final hidden states over each document's first
--max-tokens tokens. A held-out split (--test-fraction) gives OUTPUT/report.json (precision, recall,
F1 at --threshold, the confusion matrix, MAE, a majority-class baseline) and report.png; the head is
saved as numpy arrays (classifier.npz) with classifier.json, for `phi-jax data score`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phi_jax.cli.common import DTYPES


def register(sub) -> None:
    p = sub.add_parser("train-classifier", help="fit a quality classifier to teacher annotations",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="comma-separated output dirs of `data annotate`")
    p.add_argument("--embedder", required=True, metavar="MODEL",
                   help="any model --model accepts: an HF dir, a phi_jax workdir, a .gguf file")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the one beside the model)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--head", default="ridge", choices=["ridge", "logistic", "forest"])
    p.add_argument("--output", required=True, help="directory for the classifier and its report")
    p.add_argument("--threshold", type=float, default=3.0, help="score counted as good for P/R/F1")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512, help="tokens of each document embedded")
    p.add_argument("--embed-batch-size", type=int, default=16)
    p.add_argument("--add-bos", action="store_true", help="start each text with BOS (Llama-family models)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from phi_jax.curation.quality.classify import train_classifier
    from phi_jax.fileio import check_writable_output
    from phi_jax.inference import loader
    from phi_jax.inference.embed import Embedder

    check_writable_output(args.output, overwrite=args.overwrite)
    loaded = loader.load(args.embedder, dtype=args.dtype, tokenizer=args.tokenizer)
    loader.require_tokenizer(loaded, args.embedder)
    embedder = Embedder(loaded.model, loaded.variables, loaded.tokenizer, max_tokens=args.max_tokens,
                        batch_size=args.embed_batch_size, add_bos=args.add_bos)
    info = {"path": str(Path(args.embedder).resolve()), "dtype": args.dtype,
            "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
            "max_tokens": embedder.max_tokens, "add_bos": args.add_bos, "source": loaded.metadata}
    report = train_classifier(args.annotations.split(","), embedder, head=args.head, output=args.output,
                              embedder_info=info, threshold=args.threshold,
                              test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite)
    held = report["held_out"]
    print(json.dumps({"head": args.head, "train": report["train"], "test": report["test"],
                      "precision": round(held["precision"], 4), "recall": round(held["recall"], 4),
                      "f1": round(held["f1"], 4), "baseline_f1": round(report["baseline_majority"]["f1"], 4),
                      "embedding_tokens_per_s": report["embedding"]["tokens_per_s"], "output": args.output}))
    return 0
