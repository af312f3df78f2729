"""Curate a folder of text files: score by educational value, filter, deduplicate, decontaminate.

    python examples/curate_folder.py                          # a demo folder built from stdlib sources
    python examples/curate_folder.py --input=DIR --output=OUT [--teacher=http://127.0.0.1:8000/v1]

Each stage is a library function (`*_stage`) run over shards by `run_stage`: it writes OUT/<stage>/
with a manifest, resumes an interrupted run shard by shard and skips a finished one on a rerun. Without
--teacher the offline heuristic annotator scores the files (a stand-in, not a model's judgement);
with it, any OpenAI-compatible endpoint does (e.g. `phi-jax serve --model=smollm2`).
"""

import argparse
import inspect
import json
import pathlib
import tempfile

from phi_jax.curation.core.runners import run_stage
from phi_jax.curation.decontaminate.remove import decontaminate_stage
from phi_jax.curation.dedup.remove import dedup_stage
from phi_jax.curation.quality.annotate import annotate_stage, load_rubric
from phi_jax.curation.quality.filter import filter_stage
from phi_jax.curation.teacher.client import TeacherConfig


def demo_folder(root: pathlib.Path) -> pathlib.Path:
    """A few stdlib modules as .py files, one of them twice (dedup must drop the copy)."""
    import argparse as a, bisect, colorsys, heapq, textwrap

    root.mkdir(parents=True, exist_ok=True)
    for module in (a, bisect, colorsys, heapq, textwrap):
        (root / f"{module.__name__}.py").write_text(inspect.getsource(module))
    (root / "heapq_copy.py").write_text(inspect.getsource(heapq))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="a folder of text files (default: a demo folder)")
    parser.add_argument("--output", help="where the stages write (default: a temporary folder)")
    parser.add_argument("--teacher", help="an OpenAI-compatible base URL; default: offline heuristic")
    parser.add_argument("--min-quality", type=float, default=3.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(args.input) if args.input else demo_folder(pathlib.Path(tmp) / "in")
        out = pathlib.Path(args.output or pathlib.Path(tmp) / "out")
        teacher = TeacherConfig(url=args.teacher) if args.teacher else None
        stages = [
            ("annotate", annotate_stage(load_rubric("code"), teacher, cache=out / "teacher-cache")),
            ("filter", filter_stage(args.min_quality, field="annotation.score")),
            ("dedup", dedup_stage(threshold=0.8)),
            ("decontaminate", decontaminate_stage(["humaneval"])),
        ]
        inputs = str(folder / "*")
        for name, stage in stages:
            manifest = run_stage(stage, inputs, out / name, progress=False)
            counts = manifest["counts"]
            print(f"{name:>14}: {json.dumps(counts)}")
            inputs = str(out / name)  # the next stage reads this one's shards
        kept = [json.loads(line) for f in sorted((out / "decontaminate").glob("*.jsonl"))
                for line in f.read_text().splitlines()]
        print(f"kept {len(kept)} documents:", sorted(r["id"].rsplit("/", 1)[-1] for r in kept))


if __name__ == "__main__":
    main()
