"""The README's numbers are the committed results: `benchmarks/readme.py` writes every generated block,
so a result changed without the README (or a number edited by hand inside a block) fails here."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import readme

ROOT = Path(__file__).resolve().parents[1]


def test_generated_blocks_match_the_committed_results():
    result = subprocess.run([sys.executable, "-m", "benchmarks.readme", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (ROOT / "README.md").read_text()
    for name in readme.BLOCKS:
        assert f"<!-- generated:{name} -->" in text, f"README.md has no generated block {name!r}"


def test_every_summary_row_is_quoted_with_its_file():
    rows = readme.benchmark_rows()
    assert rows, "no benchmark summary rows under benchmarks/results/"
    block = readme.benchmarks_block()
    for row in rows:
        assert row["file"] in block
        data = json.loads((ROOT / row["file"]).read_text())
        assert any(r["case"] == row["case"] for r in data["summary"])


def test_a_stale_block_is_rewritten(tmp_path):
    stale = "intro\n<!-- generated:tests -->\nby hand: 1 passed\n<!-- /generated:tests -->\noutro\n"
    fresh = readme.render(stale)
    assert "by hand" not in fresh
    assert fresh.startswith("intro\n<!-- generated:tests -->\n") and fresh.endswith("<!-- /generated:tests -->\noutro\n")
    assert readme.render(fresh) == fresh
