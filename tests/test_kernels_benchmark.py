"""The kernel benchmark still runs: its smallest case (T=64, head dim 64, one repeat), written to
a temporary directory. No timing is asserted (interpret mode on a shared CPU); what is asserted is
that every implementation that can run here ran, the causal FLOP count is the honest one, and the
JSON and PNG are written."""

import json

import pytest

pytest.importorskip("matplotlib")

from benchmarks import kernels  # noqa: E402


def test_visible_pairs_counts_only_causal_entries():
    assert kernels.visible_pairs(1, 1, 4, causal=True) == 10  # 4 + 3 + 2 + 1
    assert kernels.visible_pairs(2, 3, 4, causal=False) == 2 * 3 * 16


@pytest.mark.slow
def test_kernel_benchmark_smallest_case(tmp_path):
    results = kernels.run(quick=True, results_dir=tmp_path, lengths=(64,), head_dims=(64,),
                          repeats=1)
    on_disk = json.loads((tmp_path / "kernels_quick.json").read_text())
    assert (tmp_path / "kernels_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["impl"]: r for r in on_disk["rows"]}
    assert set(rows) == {"xla", "pallas"} and not any("error" in r for r in rows.values())
    pairs = kernels.visible_pairs(1, kernels.HEADS, 64, causal=True)
    for r in rows.values():
        fwd = r["fwd_tflops"]["samples"][0] * r["fwd_ms"]["samples"][0] * 1e-3
        assert abs(fwd - 4 * pairs * 64 / 1e12) < 1e-12
    assert [s["reference_name"] for s in results["summary"]] == ["xla", "xla"]
    assert "needs a GPU" in on_disk["cudnn"]
