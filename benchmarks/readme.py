"""The measured numbers of the README and the docs site, written from the committed results — never by hand.

    python -m benchmarks.readme            # rewrite every generated block of README.md and docs/**/*.md
    python -m benchmarks.readme --check    # exit 1 if a block is stale (a test runs this)

A generated block sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`, in whichever
page it belongs (the blocks moved from the README into the docs when the README became a landing page):
  * `benchmarks` (docs/performance.md): one table of every benchmark's `summary` rows in
    benchmarks/results/ (phi_jax, the reference measured in the same run, the ratio, the machine and
    date of the run);
  * `main-job` (docs/training.md): README command 1 as measured by `python -m benchmarks.main_job`;
  * `main-job-short` (README.md): the same in three lines and the sample beside them;
  * `tests` (docs/install.md): the test count and CI time of the last `bash .ci/run` (copied into
    benchmarks/results/ci.json with `python -m benchmarks.readme --ci-report=ci_report.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)",
                    re.S)


def _number(x: float) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _when(data: dict, allocator: bool = True) -> str:
    machine = data.get("machine", {})
    parts = [str(machine.get("date", ""))[:10]]
    load = (machine.get("load_average_start") or [None])[0]
    if isinstance(load, (int, float)):
        parts.append(f"load {load:.1f}")
    if allocator and machine.get("allocator"):
        parts.append(machine["allocator"])
    return ", ".join(parts)


def _date(data: dict) -> str:
    return str(data.get("machine", {}).get("date", ""))


def benchmark_rows(results: pathlib.Path = RESULTS) -> list[dict[str, Any]]:
    """Every summary row of the newest result of each benchmark (a full or a `_quick` run, whichever
    ran last) in each folder; `run*.json` (the runner's roll-up) adds only rows no module file has."""
    latest: dict[tuple[pathlib.Path, str], tuple[str, pathlib.Path, dict]] = {}
    for file in sorted(results.rglob("*.json")):
        try:
            data = json.loads(file.read_text())
        except ValueError:
            continue
        summary = data.get("summary") if isinstance(data, dict) else None
        if not isinstance(summary, list) or not all(isinstance(r, dict) and "case" in r for r in summary):
            continue  # not a comparison against a reference (e.g. finetune's before/after report)
        key = (file.parent, file.stem.removesuffix("_quick"))
        if key not in latest or _date(data) >= latest[key][0]:
            latest[key] = (_date(data), file, data)
    rows, seen = [], set()
    for (folder, stem), (_, file, data) in sorted(latest.items(), key=lambda kv: (kv[0][1] == "run", kv[0])):
        for row in data["summary"]:
            if (folder, row.get("benchmark"), row.get("case")) in seen:
                continue
            seen.add((folder, row.get("benchmark"), row.get("case")))
            rows.append(dict(row, file=str(file.relative_to(ROOT)), when=_when(data)))
    return rows


def benchmarks_block() -> str:
    lines = ["| benchmark | case | phi_jax | reference (same run) | ratio | note | run |",
             "|---|---|---|---|---|---|---|"]
    for r in benchmark_rows():
        ratio = r.get("ratio")
        ratio_text = f"**{ratio:.2f}×**" if isinstance(ratio, (int, float)) else "-"
        lines.append(f"| {r['benchmark']} | {r['case']} | {_number(r.get('phi_jax'))} {r.get('metric', '')} "
                     f"| {_number(r.get('reference'))} ({r.get('reference_name', '-')}) | {ratio_text} "
                     f"| {r.get('note', '')} | {r['when']}, `{r['file']}` |")
    return "\n".join(lines) + "\n"


def main_job_block() -> str:
    file = RESULTS / "main_job.json"
    if not file.exists():
        return "_not measured yet: run `python -m benchmarks.main_job`_\n"
    d = json.loads(file.read_text())
    s = d["summary"]
    lines = [f"Measured by `python -m benchmarks.main_job` ({_when(d, allocator=False)}, {d['machine'].get('cpu', '')}, "
             f"allocator {d.get('allocator', '?')}): install excluded, **{d['train_seconds'] / 60:.1f} min** "
             f"for `phi-jax train` and {d['sample_seconds']:.0f} s for `phi-jax sample`.", ""]
    for stage in d.get("stages", []):
        lines.append(f"- `{stage}`")
    lines.append(f"- training: {s['total_steps']} steps; smoothed train loss {d['smoothed_loss'][0]:.2f} ± "
                 f"{d['smoothed_loss'][1]:.2f} (last {d['smoothed_loss'][2]} steps); held-out loss "
                 f"**{s['heldout'][-1]['loss']:.2f}** (perplexity {math.exp(s['heldout'][-1]['loss']):.0f}) "
                 f"on {s['heldout_tokens']:,} held-out tokens; {d['tokens_per_s']:,.0f} tokens/s")
    variants = (  # (file, how it differs from command 1 as written, what command 1 has instead)
        ("main_job_system.json", "under glibc's malloc (`PHI_JAX_ALLOCATOR=system`",
         f"with the retaining allocator ({d.get('allocator', '?')})"),
        ("main_job_scanned.json", "with the layers scanned, as configs/tiny.py had them before "
         "(`--config.model.scan_layers=True`", "with unrolled layers"))
    for name, how, instead in variants:
        if (RESULTS / name).exists():
            g = json.loads((RESULTS / name).read_text())
            lines.append(f"- the same command {how}, {_when(g, allocator=False)}): "
                         f"{g['train_seconds'] / 60:.1f} min, {g['tokens_per_s']:,.0f} tokens/s; {instead} "
                         f"command 1 takes **{d['train_seconds'] / g['train_seconds']:.2f}×** that time "
                         f"({d['tokens_per_s'] / g['tokens_per_s']:.2f}× its training tokens/s)")
    lines.append(f"- a rerun of the same command trains nothing ({d['rerun_seconds']:.0f} s): "
                 f"`{d['rerun_first_line']}`")
    lines.append("- the sample (temperature 0.8, seed 0):")
    lines.append("")
    lines.append("```python")
    lines.append(d["sample"].rstrip())
    lines.append("```")
    return "\n".join(lines) + "\n"


def main_job_short_block() -> str:
    file = RESULTS / "main_job.json"
    if not file.exists():
        return "_not measured yet: run `python -m benchmarks.main_job`_\n"
    d = json.loads(file.read_text())
    heldout = d["summary"]["heldout"][-1]["loss"]
    lines = [f"Measured by `python -m benchmarks.main_job` ({_when(d, allocator=False)}, {d['machine'].get('cpu', '')}, "
             f"{d['machine'].get('cpu_count', '?')} cores): **{d['train_seconds'] / 60:.1f} min** for `phi-jax train` (install excluded: "
             f"{d['summary']['total_steps']} steps, {d['tokens_per_s']:,.0f} tokens/s, held-out loss "
             f"{heldout:.2f}, perplexity {math.exp(heldout):.0f}) and {d['sample_seconds']:.0f} s for "
             f"`phi-jax sample`, which wrote (temperature 0.8, seed 0):",
             "",
             "```python",
             d["sample"].rstrip(),
             "```"]
    return "\n".join(lines) + "\n"


def tests_block() -> str:
    file = RESULTS / "ci.json"
    if not file.exists():
        return "_not measured yet: run `bash .ci/run`_\n"
    d = json.loads(file.read_text())
    return (f"The last `bash .ci/run` from a fresh clone ({d['date']}, {d['machine']}): **{d['passed']} passed**"
            + (f", {d['skipped']} skipped" if d.get("skipped") else "")
            + f"; install {d['install_seconds'] / 60:.1f} min, tests {d['test_seconds'] / 60:.1f} min, "
            f"{d['total_seconds'] / 60:.1f} min in all.\n")


BLOCKS: dict[str, Callable[[], str]] = {"benchmarks": benchmarks_block, "main-job": main_job_block,
                                        "main-job-short": main_job_short_block, "tests": tests_block}


def pages() -> list[pathlib.Path]:
    """The README and every page of the docs site: where generated blocks may sit."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def render(text: str) -> str:
    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"a generated block {name!r} this script does not know")
        return m.group(1) + BLOCKS[name]() + m.group(4)

    return _BLOCK.sub(one, text)


def import_ci_report(path: str) -> None:
    """Copy the numbers of a `.ci/run` report into benchmarks/results/ci.json."""
    report = json.loads(pathlib.Path(path).read_text())
    (RESULTS / "ci.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated block is stale")
    parser.add_argument("--ci-report", help="a ci_report.json written by .ci/run to import first")
    args = parser.parse_args(argv)
    if args.ci_report:
        import_ci_report(args.ci_report)
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text)
        if new == text:
            continue
        stale.append(str(page.relative_to(ROOT)))
        if not args.check:
            page.write_text(new)
    if args.check and stale:
        print(f"generated blocks are stale in {', '.join(stale)}: run `python -m benchmarks.readme`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
