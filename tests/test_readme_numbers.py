"""The measured numbers of the README and the docs site are the committed results:
`benchmarks/readme.py` writes every generated block (docs/performance.md, docs/training.md,
docs/install.md, README.md), so a result changed without its page (or a number edited by hand inside
a block) fails here."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import readme

ROOT = Path(__file__).resolve().parents[1]
# Where each generated block lives (each exactly once), so a block moved or lost fails here.
HOMES = {"benchmarks": "docs/performance.md", "main-job": "docs/training.md",
         "main-job-short": "README.md", "tests": "docs/install.md"}


def test_generated_blocks_match_the_committed_results():
    result = subprocess.run([sys.executable, "-m", "benchmarks.readme", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(HOMES) == set(readme.BLOCKS)
    for name, home in HOMES.items():
        found = [str(p.relative_to(ROOT)) for p in readme.pages()
                 if f"<!-- generated:{name} -->" in p.read_text()]
        assert found == [home], f"generated block {name!r} is in {found}, expected only in {home}"


def test_every_summary_row_is_quoted_with_its_file():
    rows = readme.benchmark_rows()
    assert rows, "no benchmark summary rows under benchmarks/results/"
    block = readme.benchmarks_block()
    page = (ROOT / HOMES["benchmarks"]).read_text()
    for row in rows:
        assert row["file"] in block and row["file"] in page
        data = json.loads((ROOT / row["file"]).read_text())
        assert any(r["case"] == row["case"] for r in data["summary"])


def test_the_readme_sample_is_the_measured_one():
    data = json.loads((ROOT / "benchmarks" / "results" / "main_job.json").read_text())
    assert data["sample"].rstrip() in (ROOT / "README.md").read_text()


def test_a_stale_block_is_rewritten(tmp_path):
    stale = "intro\n<!-- generated:tests -->\nby hand: 1 passed\n<!-- /generated:tests -->\noutro\n"
    fresh = readme.render(stale)
    assert "by hand" not in fresh
    assert fresh.startswith("intro\n<!-- generated:tests -->\n") and fresh.endswith("<!-- /generated:tests -->\noutro\n")
    assert readme.render(fresh) == fresh
