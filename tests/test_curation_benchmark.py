"""The curation benchmark still runs: its smallest case, written to a temporary directory.

No speed is asserted (the machine is shared); what is asserted is what makes it worth reading:
every document is accounted for at every concurrency, the reference row is there, and the JSON
and PNG are written.
"""

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import curation  # noqa: E402


@pytest.mark.slow
def test_curation_benchmark_smallest(tmp_path):
    results = curation.run(quick=True, documents=4, max_tokens=2, max_chars=300, max_len=2048,
                           classifier_documents=24, results_dir=tmp_path)
    on_disk = json.loads((tmp_path / "curation_tiny-random_quick.json").read_text())
    assert (tmp_path / "curation_tiny-random_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_disk["annotation_speedup_vs_concurrency_1"]["1"] == 1.0
    for row in results["annotation"].values():
        assert row["documents"] == 4 == row["scored"] + row["unparsed"] + row["refused"]
        assert sum(row["score_histogram"].values()) == row["scored"]
        assert 0 < sum(row["unparsed_reasons"].values()) <= row["unparsed"] or row["unparsed"] == 0
        assert len(row["example_answers"]) == min(4, row["documents"])
    assert results["embedding"]["batched"]["tokens"] == results["embedding"]["one_per_call"]["tokens"] > 0
    assert results["classifier"]["documents"] == 24 and set(results["classifier"]["heads"]) == set(curation.HEADS)
