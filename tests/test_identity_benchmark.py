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
    for a, b in identity_bench.DIFFERENCE_PAIRS:
        assert summary["differences"][f"{a}-{b}"][step]["control_pattern"]["units"] == 1, (a, b)
    assert summary["cost"]["ratio"] > 0
    assert "| identity mode, one K/V pair |" in identity_bench.tables(summary, identity_bench.QUICK)
    again = identity_bench.Benchmark(identity_bench.QUICK, tmp_path, backend=backend, classifier=classifier)
    monkeypatch.setattr(again, "train_to", lambda checkpoint, runs: pytest.fail("trained again"))
    monkeypatch.setattr(again, "score", lambda jobs: pytest.fail("scored again"))
    again.run()


def test_the_readings_count_what_the_samples_show_for_each_control_prompt(identity_bench, tmp_path, monkeypatch):
    """Each background prompt gets the share of samples whose object and whose background show the asked colour,
    each pattern prompt the share showing the asked pattern, for every trained row and the base model's own words;
    the counts are the classifier's readings of exactly those samples."""
    from dataclasses import replace

    import torch

    from dreamartist.toyworld import load_backend
    from dreamartist.toyworld.world import ATTRIBUTES, VALUES

    plan = replace(identity_bench.QUICK, samples=2, checkpoints=(2,))
    reference = plan.concepts[0]

    class Reads:  # every sample read as a blue star on a blue background, striped
        def predict(self, images):
            value = {a: VALUES[a].index(v) for a, v in zip(ATTRIBUTES, ("star", "blue", "blue", "striped"))}
            return torch.tensor([[value[a] for a in ATTRIBUTES]] * len(images))

    methods = {m: identity_bench.METHODS[m] for m in identity_bench.READING_METHODS}
    bench = identity_bench.Benchmark(plan, tmp_path, methods, backend=load_backend(device="cpu"), classifier=Reads())
    lines = identity_bench.readings(bench).splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith(f"| {reference.shape} |")]
    sources = {row[1] for row in rows}
    assert sources == {m.label for m in methods.values()} | {"base, shape word", "base, colour and shape"}
    backgrounds = [row for row in rows if row[2].startswith("background")]
    patterns = [row for row in rows if row[2].startswith("pattern")]
    assert len(backgrounds) == len(patterns) == len(sources) * plan.values_per_attribute
    for row in backgrounds:  # the asked colour on the object and on the background: 1.00 only where it is blue
        blue = "1.00" if row[2].endswith("blue") else "0.00"
        assert row[3:5] == [blue, blue] and row[5] == ""
    for row in patterns:
        assert row[3:5] == ["", ""] and row[5] == ("1.00" if row[2].endswith("striped") else "0.00")
    assert all(row[6].rstrip(" |") == ("1.00" if reference.shape == "star" else "0.00") for row in rows)
