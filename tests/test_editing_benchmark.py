"""The toy-world editing benchmark (benchmarks/editing.py): its cases are held-out renders each edited in one
attribute, its scores come from what was rendered, and its quick plan runs every row, resumes from its ledger and
writes every output where it is told (a temporary folder by default)."""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamartist.toyworld.world import ATTRIBUTES, held_out_scenes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier():
    from dreamartist.toyworld import load_classifier

    return load_classifier()


@pytest.fixture(scope="module")
def toy():
    pytest.importorskip("diffusers")
    from dreamartist.toyworld import load_backend

    return load_backend(device="cpu")


def test_the_full_plan_edits_40_held_out_renders_in_one_attribute_at_a_time(editing):
    full = editing.cases(editing.FULL)
    sources = {(c.source, c.seed) for c in full}
    assert len(sources) == 40 and {c.seed for c in full} == {editing.RENDER_SEED + i for i in range(40)}
    assert {s for s, _ in sources} <= set(held_out_scenes())
    for attribute in editing.EDITED:
        assert sum(c.attribute == attribute for c in full) == 40
    for case in full:
        changed = [a for a in ATTRIBUTES if case.source.value(a) != case.target.value(a)]
        assert changed == [case.attribute]
    assert full == editing.cases(editing.FULL)  # fixed: the same plan every time
    # a smaller plan takes the same renders and targets
    assert set(editing.cases(editing.QUICK)) <= set(full)


def test_the_scores_are_computed_from_what_was_rendered(editing, classifier):
    for case in editing.cases(editing.FULL)[:8]:  # two renders, every attribute
        region = editing.kept_region(case)
        assert 200 < region.sum() < region.size
        source, ideal = editing.source_array(case), editing.ideal_array(case)
        assert np.array_equal(source[region], ideal[region])  # the ideal edit leaves the kept region as it was
        unchanged = editing.score(classifier, case, Image.fromarray(source))
        assert unchanged["success"] == 0 and unchanged["preserved"] == 1 and unchanged["kept_share"] == 1
        assert unchanged["region_error"] == 0 and unchanged["ideal_error"] > 0
        perfect = editing.score(classifier, case, Image.fromarray(ideal))
        assert perfect["success"] == 1 and perfect["preserved"] == 1 and perfect["joint"] == 1
        assert perfect["region_error"] == 0 and perfect["ideal_error"] == 0
        spoilt = source.copy()
        spoilt[region] = 255 - spoilt[region]  # everything the edit must keep, inverted
        assert editing.score(classifier, case, Image.fromarray(spoilt))["region_error"] > 50
    # colour and shape edits keep what is outside the object; background and pattern edits the object itself
    colour, background = editing.cases(editing.FULL)[:2]
    assert colour.attribute == "colour" and background.attribute == "background"
    assert not (editing.kept_region(colour) & editing.kept_region(background)).any()


def test_the_quick_plan_runs_every_row_resumes_and_writes_its_outputs(editing, toy, classifier, tmp_path):
    plan = editing.QUICK
    bench = editing.Benchmark(plan, tmp_path / "work", backend=toy, classifier=classifier, log=lambda *a: None)
    assert bench.run()
    summary = editing.summarize(bench.ledger.records, plan)
    editing.check_ranges(summary)  # what `python benchmarks/editing.py --quick` runs
    assert summary["done"] == summary["cases"] == 2
    for key in editing.rows(plan):
        assert summary["rows"][key]["all"]["success"]["units"] == 2, key
    for case in bench.cases:  # the unedited input and the ideal edit through the VAE keep what they should
        assert bench.ledger.records[bench.key(case, "ideal")]["success"] == 1
        assert bench.ledger.records[bench.key(case, "input")]["success"] == 0
    cost = summary["cost"]
    for lr in plan.ttis_lrs:
        measured = cost["by_lr"][f"{lr:g}"]
        assert measured["edit_wall_ratio"] > measured["reedit_wall_ratio"] > 0
        runs = measured["runs"][0]
        assert runs["plain"]["forward"] == 2 * plan.cost_steps and runs["reedit"]["backward"] == 0
    assert "unet" not in vars(toy)  # the cost's counting wrapper is gone
    again = editing.Benchmark(plan, tmp_path / "work", backend=toy, classifier=classifier, log=lambda *a: None)
    assert all(not again.todo(case) for case in again.cases) and again.run()  # nothing left to do
    assert again.ledger.records == bench.ledger.records
    editing.write(summary, plan, tmp_path / "out", tmp_path / "work", True)
    written = json.loads((tmp_path / "out" / "editing.json").read_text())
    assert written["finished"] and written["summary"]["done"] == 2
    assert "| BARET, TTIS lr 0.001 |" in (tmp_path / "out" / "editing.md").read_text()
    for lr in plan.ttis_lrs:  # how far TTIS got, from what each case recorded
        ttis = summary["ttis"][f"baret@{lr:g}"]
        taken = [bench.ledger.records[bench.key(case, f"baret@{lr:g}")]["ttis_iterations"] for case in bench.cases]
        assert ttis["cases"] == 2 and ttis["iterations"] == statistics.median(taken)
        assert 0 < ttis["loss"] and ttis["iterations"] <= 5 * plan.steps
    assert "### TTIS's early stop" in (tmp_path / "out" / "editing.md").read_text()
    for name in ("editing.png", "editing-example.png"):
        assert Image.open(tmp_path / "out" / name).size[0] > 500


def test_quick_writes_into_a_temporary_folder_unless_told_otherwise(editing):
    out = editing.default_out(quick=True)
    try:
        assert out.is_relative_to(tempfile.gettempdir()) and out != editing.DEFAULT_OUT
        assert editing.default_out(quick=False) == ROOT / "benchmarks" / "results"
    finally:
        out.rmdir()


def test_the_readings_are_baret_at_the_papers_lr_each_with_its_own_change_and_are_not_competitors(editing):
    from dataclasses import replace

    from dreamartist.edit_config import EditConfig

    assert not any(row.kind == editing.READING for row in editing.rows(editing.QUICK).values())
    plan = replace(editing.QUICK, readings=True)
    readings = [key for key, row in editing.rows(plan).items() if row.kind == editing.READING]
    assert readings == [f"{name}@{plan.ttis_lrs[0]:g}" for name in editing.READINGS]  # the paper's lr only
    paper = EditConfig(target="a red square")
    changed = [paper.replace(**editing.VARIANTS[key.split("@")[0]]) for key in readings]
    assert paper not in changed and len(set(changed)) == len(changed)
    # the goal compares BARET with other methods only, never with a reading of itself
    interval = {"mean": 0.1, "low": 0.05, "high": 0.15, "units": 20}
    summary = {"rows": {key: {"label": key, "kind": row.kind} for key, row in editing.rows(plan).items()},
               "differences": {f"baret@0.001|{key}": {"all": {f: interval for f in editing.FIGURES}}
                               for key in editing.rows(plan)}}
    compared = [line.split(":")[0] for line in editing.goal(summary, "baret@0.001")]
    assert "baret-nobam@0.001" in compared and not set(readings) & set(compared)


def test_rows_share_an_inversion_only_where_it_is_the_same(editing):
    """A case inverts once per TTIS lr for BARET and the readings that change only the editing pass; a reading that
    changes the inversion itself (its text) gets its own."""
    from dataclasses import replace

    from dreamartist.baret import inversion_options

    plan = replace(editing.FULL, renders=1, attributes=("colour",))
    bench = editing.Benchmark(plan, Path(tempfile.mkdtemp()), backend=object(), classifier=object())
    (case,) = bench.cases
    keys = {row: inversion_options(bench.baret_config(case, row)) for row in editing.rows(plan)
            if row.startswith("baret")}
    assert len(set(keys.values())) == len(plan.ttis_lrs) + 1
    assert keys["baret@0.001"] == keys["baret-nobam@0.001"] == keys["baret-tausa0.1@0.001"]
    assert keys["baret-targetinv@0.001"] != keys["baret@0.001"]
    assert keys["baret@0.01"] != keys["baret@0.001"]


def test_a_run_at_another_guidance_keeps_its_records_apart(editing):
    """The ledger keys of the default CFG stay as they were; another CFG's cases and cost are keyed apart and a
    summary of one never counts the other's."""
    from dataclasses import replace

    default = replace(editing.FULL, renders=1, attributes=("colour",))
    paper = replace(default, cfg=7.5)
    work = Path(tempfile.mkdtemp())
    bench = {plan.cfg: editing.Benchmark(plan, work, backend=object(), classifier=object())
             for plan in (default, paper)}
    (case,) = bench[default.cfg].cases
    assert bench[default.cfg].key(case, "ddim") == f"{case.key}@ddim@{default.steps}"
    assert bench[7.5].key(case, "ddim") == f"{case.key}@ddim@{default.steps}@cfg7.5"
    assert bench[7.5].cost_key() != bench[default.cfg].cost_key()
    figures = {f: 1.0 for f in editing.FIGURES} | {"seconds": 1.0, "ttis_iterations": 100, "ttis_loss": 0.1}
    records = {bench[7.5].key(case, row): figures for row in editing.rows(paper)}
    records[bench[7.5].cost_key()] = {"cost": {"steps": paper.cost_steps}}
    assert editing.summarize(records, paper)["done"] == 1 and editing.summarize(records, paper)["cost"]
    assert editing.summarize(records, default)["done"] == 0 and editing.summarize(records, default)["cost"] is None
