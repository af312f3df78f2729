"""The benchmarks still run: each one's smallest case, one repeat, written to a temporary dir.

No timing is asserted (the machine is shared); what is asserted is what makes a benchmark worth
reading: phi_jax and transformers do the same work (first- and second-step losses agree, greedy
tokens are equal), the statistics are well formed, and the JSON and PNG are written.
"""

import json
import sys
import types

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from benchmarks import common, decode, dedup, roofline, run, train_step  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_written(tmp_path, stem: str, results: dict) -> dict:
    on_disk = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
    assert on_disk["summary"] == json.loads(json.dumps(results["summary"]))
    m = on_disk["machine"]
    assert m["cpu_count"] >= 1 and m["date"] and "jax" in m["versions"]
    assert len(m["load_average_start"]) == 3 and len(m["load_average_end"]) == 3
    return on_disk


def _check_stats(s: dict, n: int) -> None:
    assert s["n"] == n == len(s["samples"])
    assert 0 < s["min"] <= s["median"] <= s["max"]


def test_stats_and_table():
    s = common.stats([3.0, 1.0, 2.0])
    assert (s["min"], s["median"], s["max"]) == (1.0, 2.0, 3.0)
    assert common.rate_stats([2.0, 4.0], 8.0)["max"] == 4.0  # fastest repeat = highest rate
    with pytest.raises(ValueError, match="at least one repeat"):
        common.stats([])
    row = common.summary_row("b", "c", "tokens/s", 30.0, 10.0, "ref")
    assert row["ratio"] == 3.0
    table = common.format_table([row], common.SUMMARY_COLUMNS).splitlines()
    assert table[0].split()[0] == "benchmark" and "3.00" in table[2]
    # a cost (memory, seconds): reference / ours, so every ratio reads "above 1: phi_jax is better"
    assert common.summary_row("m", "c", "peak RSS GB", 2.0, 8.0, "ref", lower_is_better=True)["ratio"] == 4.0
    assert common.summary_row("m", "c", "peak RSS GB", None, 8.0, "ref", lower_is_better=True)["ratio"] is None


def test_roofline_smallest(tmp_path):
    results = roofline.run(quick=True, repeats=1, sizes=(128,), results_dir=tmp_path)
    _check_written(tmp_path, "roofline_quick", results)
    (row,) = results["jax_matmul"]["rows"]
    assert row["flops"] == 2 * 128 ** 3
    _check_stats(row["flop_per_s"], 1)
    assert results["jax_matmul"]["peak_flop_per_s"] == row["flop_per_s"]["max"]
    assert results["memory_bandwidth"]["bytes_per_s"]["max"] > 0


@pytest.mark.slow
def test_train_step_smallest_same_work(tmp_path):
    results = train_step.run(quick=True, repeats=1, cases=["test"], results_dir=tmp_path,
                             compile_torch=False)
    _check_written(tmp_path, "train_step_quick", results)
    (case,) = results["cases"]
    check = case["loss_check"]
    # Same weights, batch and AdamW on both sides: the losses before and after one update agree.
    assert check["agree"], check
    assert check["phi_jax"][1] < check["phi_jax"][0]  # the update did something
    assert case["tokens_per_step"] == 2 * 16
    assert "phi_jax" in case["tokens_per_s"] and case["best_reference"].startswith("torch eager")
    for s in case["tokens_per_s"].values():
        _check_stats(s, 1)
    ref = case["tokens_per_s"][case["best_reference"]]["median"]
    assert case["ratio_vs_best_reference"] == pytest.approx(
        case["tokens_per_s"]["phi_jax"]["median"] / ref)
    assert case["fraction_of_matmul_peak"] > 0
    # both layer layouts start from the same weights and compute the same losses; the faster is phi_jax's
    by_layout = check["phi_jax_by_layout"]
    assert set(by_layout) == set(case["phi_jax_by_layout"]) == {"scanned", "unrolled"}
    np.testing.assert_allclose(by_layout["scanned"], by_layout["unrolled"], rtol=1e-5)
    assert case["tokens_per_s"]["phi_jax"] == case["phi_jax_by_layout"][case["phi_jax_layout"]]
    assert case["phi_jax_layout"] == max(case["phi_jax_by_layout"],
                                         key=lambda k: case["phi_jax_by_layout"][k]["median"])


@pytest.mark.slow
def test_decode_smallest_equal_tokens(tmp_path):
    results = decode.run(quick=True, repeats=1, cases=["test-b2"], results_dir=tmp_path,
                         prompt_len=12, new_tokens=6)
    _check_written(tmp_path, "decode_quick", results)
    (case,) = results["cases"]
    # Greedy phi_jax.generate and transformers' generate with the same weights: the same tokens.
    assert case["tokens_equal"] and case["sequences_equal"] == 2, case["first_mismatch"]
    for s in case["tokens_per_s"].values():
        _check_stats(s, 1)
    assert case["weight_stream_bound_steps_per_s"] > 0


@pytest.mark.slow
def test_dedup_smallest_same_pairs_both_sides(tmp_path):
    pytest.importorskip("datasketch")
    pytest.importorskip("rensa")
    results = dedup.run(quick=True, docs=200, million_docs=3000, decon_docs=20, results_dir=tmp_path)
    _check_written(tmp_path, "dedup_quick", results)
    (e2e,) = results["end_to_end"]
    assert len(e2e["pair_caught"]["phi_jax"]) == len(e2e["pair_caught"]["datasketch"]) == e2e["pairs"] == 50
    for side in ("phi_jax", "datasketch"):  # both sides dedup the same planted pairs, with the same curve
        assert e2e[side]["recall_above_t+0.05"] >= 0.9 and e2e[side]["false_positives_below_t-0.2"] <= 0.1
        assert 0 < e2e[side]["docs_per_s"]["min"] <= e2e[side]["docs_per_s"]["max"]
    dec = results["decontamination"]
    assert {v["documents_changed"] for v in dec.values() if isinstance(v, dict)} == {dec["planted"]}
    assert results["million"]["counts"]["records_in"] == 3000 and results["million"]["peak_rss_bytes"] > 0


def test_unknown_case_names_the_choices():
    with pytest.raises(ValueError, match="choose from"):
        train_step.run(quick=True, cases=["phi-7b"])
    with pytest.raises(ValueError, match="choose from"):
        decode.run(quick=True, cases=["tiny-b3"])


def test_runner_skips_missing_and_survives_failures(tmp_path, monkeypatch):
    broken = types.ModuleType("benchmarks.broken")

    def fail(quick, results_dir=None):
        raise RuntimeError("boom")

    broken.run = fail
    monkeypatch.setitem(sys.modules, "benchmarks.broken", broken)
    monkeypatch.setattr(run, "BENCHMARKS", ("not_written_yet", "broken", "roofline"))
    monkeypatch.setattr(roofline, "QUICK_SIZES", (64,))
    status = run.main(["--quick", "--results-dir", str(tmp_path)])
    assert status == 1  # a failed benchmark fails the run ...
    index = json.loads((tmp_path / "run_quick.json").read_text())
    entries = index["benchmarks"]
    assert entries["not_written_yet"]["status"] == "skipped"
    assert "does not exist" in entries["not_written_yet"]["note"]
    assert entries["broken"]["status"] == "error" and "boom" in entries["broken"]["error"]
    assert entries["roofline"]["status"] == "ok"  # ... but the others still ran
    assert 0.05 < entries["roofline"]["peak_rss_gb"] < 20  # its own process's peak (Python + jax)
    assert (tmp_path / "roofline_quick.json").exists()
    assert (tmp_path / "run_quick.png").read_bytes()[:8] == PNG_MAGIC
    assert [r["benchmark"] for r in index["summary"]] == ["roofline", "roofline"]


def test_data_vs_train_ratio():
    data = {"pipeline": [{"num_workers": 0, "tokens_per_s": 300.0},
                         {"num_workers": 2, "tokens_per_s": 500.0}]}
    train = {"cases": [{"case": "tiny", "tokens_per_s": {"phi_jax": {"median": 100.0}}}]}
    (row,) = run.data_vs_train(data, train)
    assert row["ratio"] == 5.0 and "2 workers" in row["case"]
    assert run.data_vs_train({"pipeline": []}, train) == []
