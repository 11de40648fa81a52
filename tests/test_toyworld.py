"""The toy world: renderer, captions and splits, the shipped model and classifier, and the quality benchmark's core."""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamartist.backend import Backend
from dreamartist.config import TrainConfig
from dreamartist.images import load_image, prepare_reference
from dreamartist.names import negative_name
from dreamartist.pairfiles import load_pair
from dreamartist.toyworld import load_backend, load_classifier
from dreamartist.toyworld.data import render_set
from dreamartist.toyworld.evaluate import generate
from dreamartist.toyworld.models import WEIGHTS_DIR
from dreamartist.toyworld.render import render, render_array
from dreamartist.toyworld.world import (
    ATTRIBUTES,
    CONCEPT_REFERENCES,
    HELD_OUT_CONCEPTS,
    REFERENCE_SEED,
    VALUES,
    Scene,
    all_scenes,
    caption,
    held_out_scenes,
    random_caption,
    training_scenes,
)
from dreamartist.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_backend():
    return load_backend(device="cpu")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_the_world_has_four_attributes_of_at_least_six_values():
    assert len(ATTRIBUTES) >= 4
    assert all(len(VALUES[a]) >= 6 for a in ATTRIBUTES)


def test_captions_are_plain_words():
    assert caption(Scene("heart", "red", "blue", "striped")) == "a red heart on a blue background, striped"
    assert caption(Scene("moon", "orange", "white", "plain")) == "an orange moon on a white background, plain"


def test_random_captions_vary_but_always_name_the_shape():
    import random

    scene = Scene("star", "yellow", "green", "dotted")
    rng = random.Random(0)
    captions = [random_caption(scene, rng) for _ in range(300)]
    assert "" in captions and caption(scene) in captions
    assert any(c.startswith("a star in yellow") for c in captions)
    assert all("star" in c for c in captions if c)


def test_the_renderer_is_deterministic_and_jitters_by_seed():
    scene = Scene("cross", "blue", "yellow", "checkered")
    first, again, other = render_array(scene, 3), render_array(scene, 3), render_array(scene, 4)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_rendered_set_is_the_same_whatever_the_number_of_render_processes():
    one, two = render_set(training_scenes(), 40, seed=7), render_set(training_scenes(), 40, seed=7, workers=2)
    assert np.array_equal(one.images, two.images) and np.array_equal(one.labels, two.labels)
    assert len({one.images[i].tobytes() for i in range(40)}) == 40  # 40 renders, not one repeated


def test_held_out_combinations_and_concepts_never_reach_pretraining():
    training = set(training_scenes())
    held_out = set(held_out_scenes())
    assert held_out and not held_out & training
    assert not {s.concept for s in training} & set(HELD_OUT_CONCEPTS)
    assert {r.concept for r in CONCEPT_REFERENCES} <= set(HELD_OUT_CONCEPTS)
    concept_scenes = sum(s.concept in HELD_OUT_CONCEPTS for s in all_scenes())
    assert len(training) + len(held_out) + concept_scenes == len(all_scenes())


def test_the_shipped_reference_is_the_first_concepts_render():
    shipped = np.asarray(load_image(ROOT / "examples" / "toy-reference.png"))
    assert np.array_equal(shipped, render_array(CONCEPT_REFERENCES[0], REFERENCE_SEED))


def test_the_classifier_reads_fresh_renders(classifier):
    rng = np.random.default_rng(5)
    scenes = [all_scenes()[i] for i in rng.choice(len(all_scenes()), 48, replace=False)]
    predicted = classifier.predict([render(s, 10_000 + i) for i, s in enumerate(scenes)])
    accuracy = (predicted == torch.tensor([s.labels() for s in scenes])).float().mean(dim=0)
    assert accuracy.min().item() >= 0.95, accuracy


def test_weights_stay_within_the_size_budget():
    files = list(WEIGHTS_DIR.glob("*.safetensors"))
    assert {f.stem for f in files} == {"text_encoder", "vae", "unet", "classifier"}
    assert sum(f.stat().st_size for f in files) <= 20_000_000


def test_the_classifier_bar_is_met():
    metrics = json.loads((WEIGHTS_DIR / "metrics.json").read_text())
    assert all(v >= 0.97 for v in metrics["classifier"]["renders"].values()), metrics["classifier"]


def test_the_base_model_bar_is_met_by_the_shipped_weights(toy_backend):
    metrics = json.loads((WEIGHTS_DIR / "metrics.json").read_text())
    assert metrics["model_hash"] == toy_backend.model_hash  # measured on these weights, not an earlier model
    accuracy = metrics["base_bar"]["accuracy"]
    assert all(accuracy[a] >= 0.9 for a in ATTRIBUTES), accuracy


def test_the_shipped_model_is_an_sd1_standalone_backend(toy_backend):
    from dreamartist.standalone import StandaloneBackend

    assert isinstance(toy_backend, StandaloneBackend) and isinstance(toy_backend, Backend)
    assert toy_backend.family == "sd1" and toy_backend.embedding_dims == {"clip_l": 64}
    assert (toy_backend.latent_channels, toy_backend.vae_scale) == (4, 4)
    assert toy_backend.text_encoder.get_input_embeddings().num_embeddings == 49408
    assert len(toy_backend.model_hash) == 10


def test_the_model_draws_the_shape_a_held_out_prompt_asks_for(toy_backend, classifier):
    scenes = [held_out_scenes()[0]]
    scenes.append(next(s for s in held_out_scenes() if s.shape != scenes[0].shape))
    predicted = torch.cat([classifier.predict(generate(toy_backend, caption(s), samples=4, seed=0, steps=12))
                           for s in scenes])
    asked = torch.tensor([s.labels() for s in scenes]).repeat_interleave(4, dim=0)
    shape = ATTRIBUTES.index("shape")
    assert (predicted[:, shape] == asked[:, shape]).float().mean().item() >= 0.75, predicted


def test_a_pair_trains_on_the_toy_model_through_the_trainer(toy_backend, tmp_path):
    image = load_image(ROOT / "examples" / "toy-reference.png")
    config = TrainConfig(name="toystar", steps=2, width=64, height=64, init_words="star")
    result = train(toy_backend, config, [prepare_reference(image, 64, 64, vae_scale=toy_backend.vae_scale)], tmp_path)
    assert result.step == 2 and len(result.losses) == 2
    pos, neg = load_pair(tmp_path, "toystar")
    assert pos.vectors["clip_l"].shape == neg.vectors["clip_l"].shape == (3, 64)
    assert neg.name == negative_name("toystar")


def _quality_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, quality)  # dataclasses look their module up there
    spec.loader.exec_module(quality)
    return quality


def test_the_quick_quality_benchmark_gives_every_figure_in_range(toy_backend, classifier, monkeypatch, tmp_path):
    quality = _quality_module(monkeypatch)
    bench = quality.Benchmark(quality.QUICK, tmp_path, backend=toy_backend, classifier=classifier)
    assert bench.run()
    summary = quality.summarize(list(bench.ledger.records.values()), quality.QUICK, bench.methods)
    quality.check_ranges(summary)  # what `python benchmarks/quality.py --quick` runs
    assert set(summary["methods"]) == {*quality.METHODS, quality.CEILING}
    for m in quality.METHODS:  # every method at every checkpoint, scored on every image
        for step in quality.QUICK.checkpoints:
            assert summary["methods"][m]["steps"][str(step)]["fidelity"]["units"] == 1
    assert "| textual inversion |" in quality.tables(summary, quality.QUICK)


def test_the_quality_benchmark_stopped_and_continued_gives_the_same_scores(toy_backend, classifier, monkeypatch,
                                                                          tmp_path):
    quality = _quality_module(monkeypatch)
    plan = quality.QUICK
    methods = {m: quality.METHODS[m] for m in ("ti", "da3_adapters")}
    whole = quality.Benchmark(plan, tmp_path / "whole", methods, toy_backend, classifier)
    assert whole.run()
    first = quality.Benchmark(replace(plan, checkpoints=plan.checkpoints[:1]), tmp_path / "parts", methods,
                              toy_backend, classifier)
    assert first.run()  # stops after the first checkpoint, as a run killed there would
    again = quality.Benchmark(plan, tmp_path / "parts", methods, toy_backend, classifier)
    assert again.run()  # the runs continue from their saved state
    def scores(bench):
        return {k: r["read"] for k, r in bench.ledger.records.items() if "run" in r}  # not the timing records

    # two runs at 10 steps; at 20 (the sweep) TI at CFG 4 and 2, the adapters at 3, 2 and 4; the words at 2 and 4
    assert scores(again) == scores(whole) and len(scores(whole)) == 2 + 5 + 2


def test_what_the_fidelity_images_keep_is_read_from_the_fidelity_prompts_only(monkeypatch):
    """Shares of the reference's shape, its colour, and its background colour on the object, over the first
    prompts' readings (the fidelity prompts); the edit prompts' readings after them do not count."""
    from dreamartist.toyworld.world import ATTRIBUTES, VALUES

    quality = _quality_module(monkeypatch)
    plan = quality.QUICK  # one sample per prompt: four fidelity readings, then the edits'
    reference = plan.concepts[0]

    def reading(shape, colour):
        scene = {"shape": shape, "colour": colour, "background": reference.background, "pattern": reference.pattern}
        return [VALUES[a].index(scene[a]) for a in ATTRIBUTES]

    other = next(s for s in VALUES["shape"] if s != reference.shape)
    read = [reading(reference.shape, reference.colour), reading(reference.shape, reference.background),
            reading(other, reference.background), reading(reference.shape, reference.colour)]
    read += [reading(other, reference.background)] * 4  # the edit prompts
    record = {"run": {"method": "ti", "concept": 0, "seed": 0}, "step": 10, "cfg": 4.0, "read": read}
    assert quality.parts([record], plan, "ti", 10, 4.0) == {"shape": 0.75, "colour": 0.5, "background colour": 0.5}
    assert quality.parts([record], plan, "ti", 20, 4.0) is None


def test_probe_time_is_counted_apart_from_the_main_plans(monkeypatch):
    quality = _quality_module(monkeypatch)
    shown = {m: quality.METHODS[m] for m in quality.REFERENCE_METHODS} | quality.PROBES
    main = {"what": "training", "seconds": 10.0, "device": "cpu", "threads": 1}  # written before probes existed
    probe = {**main, "seconds": 3.0, "methods": sorted(quality.PROBES)}
    for methods, seconds in ((quality.METHODS, 10.0), (shown, 3.0)):
        summary = quality.summarize([main, probe], quality.PROBE_PLAN, methods)
        assert summary["seconds"] == {"cpu, 1 thread": {"training": seconds}}


def test_the_cli_without_a_checkpoint_trains_on_the_toy_model_at_its_own_size(tmp_path, capsys):
    from dreamartist.cli import main

    code = main(["train", "--image", str(ROOT / "examples" / "toy-reference.png"), "--name", "toystar",
                 "--out", str(tmp_path / "emb"), "--previews", str(tmp_path / "previews"), "--steps", "1",
                 "--preview-every", "1", "--no-final-preview"])
    assert code == 0 and "toy-world model" in capsys.readouterr().out
    preview = Image.open(tmp_path / "previews" / "toystar-step00001.png")
    assert all(side % 64 == 0 and side <= 128 for side in preview.size), preview.size  # 64 px samples, not 512


def test_stage_seconds_sum_over_resumes_but_a_redone_stage_keeps_its_last_run(tmp_path, monkeypatch):
    """A resumed UNet adds to its earlier seconds; the bar, sampled anew on every run, does not."""
    from dreamartist.toyworld import pretrain

    class Stub:
        def __init__(self, *args):
            pass

        def unet(self):
            pass

        def bar(self):
            pass

    monkeypatch.setattr(pretrain, "Pretraining", Stub)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main's process-wide settings stay out
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: True)
    (tmp_path / "timings.json").write_text(json.dumps({s: {"wall": 100.0, "cpu": 100.0} for s in ("unet", "bar")}))
    assert pretrain.main(["--run-dir", str(tmp_path), "--stages", "unet,bar"]) == 0
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["unet"]["wall"] >= 100 and timings["unet"]["cpu"] >= 100
    assert timings["bar"]["wall"] < 100 and timings["bar"]["cpu"] < 100
