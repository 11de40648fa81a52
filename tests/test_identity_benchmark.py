"""The toy-world identity benchmark (benchmarks/identity.py): its quick plan trains and scores every row, measures the
attention mass and the cost, gives every figure in range, and a second call finds everything done in its ledger."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_plan_scores_every_row_and_resumes_from_its_ledger(identity_bench, tmp_path, monkeypatch):
    from dreamartist.toyworld import load_backend, load_classifier

    backend, classifier = load_backend(device="cpu"), load_classifier()
    bench = identity_bench.Benchmark(identity_bench.QUICK, tmp_path, backend=backend, classifier=classifier)
    bench.run()
    summary = identity_bench.summarize(bench.ledger.records, identity_bench.QUICK, identity_bench.METHODS)
    identity_bench.check_ranges(summary)  # what `python benchmarks/identity.py --quick` runs
    step = str(identity_bench.QUICK.checkpoints[-1])
    for m in identity_bench.METHODS:
        assert summary["methods"][m]["steps"][step]["identity"]["units"] == 1, m
    for m in identity_bench.MASS_ROWS:
        assert summary["mass"][m]["0"]["units"] == summary["mass"][m][step]["units"] == 1, m
    assert summary["cost"]["ratio"] > 0
    assert "| identity mode, one K/V pair |" in identity_bench.tables(summary, identity_bench.QUICK)
    again = identity_bench.Benchmark(identity_bench.QUICK, tmp_path, backend=backend, classifier=classifier)
    monkeypatch.setattr(again, "train_to", lambda checkpoint: pytest.fail("trained again"))
    monkeypatch.setattr(again, "score", lambda jobs: pytest.fail("scored again"))
    again.run()
