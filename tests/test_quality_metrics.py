"""The benchmarks' metrics on hand-made classifier readings, the bootstrap intervals on known data, the ledger."""
from __future__ import annotations

import math

import pytest
import torch

from dreamartist.toyworld.intervals import bootstrap, paired
from dreamartist.toyworld.ledger import Ledger
from dreamartist.toyworld.metrics import edit_scores, faithful, identity_scores, share
from dreamartist.toyworld.world import VALUES, Scene

STAR = Scene("star", "purple", "yellow", "dotted")


def reads(*scenes: tuple[str, str, str, str]) -> torch.Tensor:
    """What the classifier returns for images it reads as these (shape, colour, background, pattern)."""
    return torch.tensor([[VALUES[a].index(v) for a, v in zip(("shape", "colour", "background", "pattern"), s)]
                         for s in scenes])


def test_an_identity_keeps_its_shape_always_and_its_colour_unless_another_is_asked():
    read = reads(("star", "purple", "green", "plain"),   # the identity, the asked green background
                 ("star", "blue", "green", "plain"),     # the shape without its colour
                 ("heart", "purple", "green", "plain"))  # the colour without its shape
    assert identity_scores(read, STAR) == {"identity": [True, False, False], "followed": [True, False, False]}
    assert identity_scores(read, STAR, "background", "green")["followed"] == [True, False, False]
    recoloured = identity_scores(read, STAR, "colour", "blue")  # the asked colour replaces the identity's own
    assert recoloured == {"identity": [True, True, False], "followed": [False, True, False]}


def test_an_image_is_faithful_only_with_the_concepts_shape_and_colour():
    read = reads(("star", "purple", "green", "plain"), ("star", "blue", "yellow", "dotted"),
                 ("heart", "purple", "yellow", "dotted"))
    assert faithful(read, STAR).tolist() == [True, False, False]


def test_an_edit_is_followed_only_with_the_concept_present_and_leak_counts_only_faithful_images():
    read = reads(("star", "purple", "green", "dotted"),   # faithful, follows the green background
                 ("star", "purple", "yellow", "dotted"),  # faithful, keeps the reference's yellow: a leak
                 ("star", "blue", "green", "dotted"),     # the edit without the concept: not followed
                 ("heart", "purple", "yellow", "dotted"))  # no concept: its yellow is no leak of the concept
    scores = edit_scores(read, STAR, "background", "green")
    assert scores["faithful"] == [True, True, False, False]
    assert scores["followed"] == [True, False, False, False]
    assert scores["asked"] == [True, False, True, False]
    assert scores["leaked"] == [False, True]
    assert share(scores["followed"]) == 0.25 and share(scores["leaked"]) == 0.5  # over all four it would be 0.5, 0.75


def test_a_share_of_nothing_is_unknown_not_zero():
    assert math.isnan(share([]))
    assert share([True, False, False, True]) == 0.5


def test_the_bootstrap_interval_of_a_constant_is_the_constant():
    interval = bootstrap([0.5] * 12)
    assert (interval.mean, interval.low, interval.high, interval.units) == (0.5, 0.5, 0.5, 12)


def test_the_bootstrap_interval_of_a_coin_has_the_normal_width():
    values = [1.0, 0.0] * 200  # mean 0.5, standard error sqrt(0.25 / 400) = 0.025
    interval = bootstrap(values)
    assert interval.mean == 0.5
    assert interval.low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert interval.high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_a_paired_difference_cancels_what_the_units_share():
    units = [0.1, 0.9, 0.4, 0.7, 0.2, 0.6]  # far apart: unpaired, the intervals of a and b overlap
    better = [u + 0.1 for u in units]
    difference = paired(better, units)
    assert difference.mean == pytest.approx(0.1) and difference.low == pytest.approx(0.1)
    assert difference.excludes_zero
    assert bootstrap(better).low < bootstrap(units).high
    assert not paired([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]).excludes_zero


def test_a_paired_difference_leaves_out_units_undefined_on_either_side():
    difference = paired([1.0, math.nan, 0.5], [0.5, 0.2, math.nan])
    assert (difference.mean, difference.units) == (0.5, 1)
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_the_ledger_keeps_what_was_finished_and_skips_a_cut_line(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.add("a", {"x": 1})
    with (tmp_path / "ledger.jsonl").open("a") as f:
        f.write('{"key": "b", "x"')  # killed in the middle of a write
    again = Ledger(tmp_path / "ledger.jsonl")
    assert "a" in again and "b" not in again
    again.add("b", {"x": 2})
    assert Ledger(tmp_path / "ledger.jsonl").records["b"]["x"] == 2


class _Reads:
    """A classifier that reads the reference, then each row of samples, as told."""

    def __init__(self, *reads: torch.Tensor):
        self.reads = list(reads)

    def predict(self, images):
        return self.reads.pop(0)


def test_the_demo_reading_counts_what_the_classifier_reads_and_says_which_part_is_kept():
    from PIL import Image

    from dreamartist.toyworld.preview import reading

    swapped = ("star", "yellow", "purple", "dotted")  # the reference's colours the other way round
    classifier = _Reads(reads(("star", "purple", "yellow", "dotted")),
                        reads(*[("star", "purple", "yellow", "dotted")] * 2, *[swapped] * 2),
                        reads(*[("star", "blue", "green", "dotted")] * 2, *[("star", "purple", "green", "plain")] * 2),
                        reads(*[("star", "yellow", "purple", "striped")] * 4))
    images = [[Image.new("RGB", (64, 64))] * 4] * 3
    lines = reading(classifier, "walle", Image.new("RGB", (64, 64)), images)
    assert lines[0] == "The classifier reads the reference as a purple star on a yellow background, dotted."
    assert lines[1] == '"a photo of a walle": the purple star in 2 of 4 samples (a star in 4, purple in 2).'
    assert lines[2].startswith('"a photo of a walle on a green background": the purple star with the green background '
                               "in 2 of 4 samples (a star in 4, purple in 2; the green background in 4)")
    assert "(fidelity 0.50, control 0.25)" in lines[-1] and "is not usable" in lines[-1]
    assert lines[-1].endswith("it keeps the shape and loses the colour (a star in 12 of 12 samples, purple in 4).")
