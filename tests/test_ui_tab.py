"""The DreamArtist tab on the stand-in webuis: built from TrainConfig, wired like the Train tab, trains a pair."""
from __future__ import annotations

import gradio as gr
import pytest
from fakehost.checks import listing
from tabhelpers import build_tab, by_elem_id, click_handler, load_extension, plain_text, reference_image

from dreamartist import config as train_config
from dreamartist.errors import InputError

FIELDS = train_config.fields()


@pytest.fixture(params=["host_v160", "host_v1101", "host_forge", "host_neo"])
def any_host(request):
    return request.getfixturevalue(request.param)


def click_args(tab, dep, **values):
    """Positional arguments of a click handler: each input's default, or values[elem_id]."""
    components = {b._id: b for b in tab.blocks.values()}
    return [values.get(components[i].elem_id, components[i].value) for i in dep["inputs"]]


def descendants(block) -> list:
    found = []
    for child in getattr(block, "children", []):
        found += [child, *descendants(child)]
    return found


def test_every_field_has_one_control_built_from_its_metadata(any_host):
    load_extension(any_host)
    controls = by_elem_id(build_tab(any_host))
    for field in FIELDS:
        control = controls[f"dreamartist_{field.name}"]
        meta = field.metadata
        assert control.value == field.default and control.label == meta["label"], field.name
        if field.type == "bool":
            assert isinstance(control, gr.Checkbox)
        elif meta["choices"]:
            assert isinstance(control, gr.Dropdown) and tuple(control.choices) == meta["choices"]
        elif field.type == "str":
            assert isinstance(control, gr.Textbox)
        else:
            assert isinstance(control, (gr.Slider, gr.Number)), field.name
            assert (control.minimum, control.maximum) == (meta["minimum"], meta["maximum"]), field.name


def test_advanced_fields_are_folded_away_and_only_they(host_v1101):
    load_extension(host_v1101)
    controls = by_elem_id(build_tab(host_v1101))
    folded = {b.elem_id for b in descendants(controls["dreamartist_advanced"])}
    for field in FIELDS:
        assert (f"dreamartist_{field.name}" in folded) == field.metadata["advanced"], field.name


def test_train_button_is_wired_like_the_webui_train_tab(host_v1101):
    load_extension(host_v1101)
    tab = build_tab(host_v1101)
    controls = by_elem_id(tab)
    _, dep = click_handler(tab, "dreamartist_train")
    assert dep["js"] == "dreamartist_start_training"
    inputs = [next(b for b in tab.blocks.values() if b._id == i).elem_id for i in dep["inputs"]]
    assert inputs[:4] == ["dreamartist_task_id", "dreamartist_reference", "dreamartist_folder", "dreamartist_mask"]
    assert inputs[4:] == [f"dreamartist_{f.name}" for f in sorted(FIELDS, key=lambda f: f.metadata["advanced"])]
    assert controls["dreamartist_task_id"].visible is False
    outputs = ("dreamartist_gallery", "dreamartist_loss", "dreamartist_result")
    assert [controls[e]._id for e in outputs] == dep["outputs"]
    then = next(d for d in tab.dependencies if d["trigger"] == "then" and d.get("trigger_after") is not None
                and tab.dependencies[d["trigger_after"]] is dep)
    assert then["outputs"] == [controls["dreamartist_resume_pair"]._id]  # refreshed after, not during, the run
    assert controls["dreamartist_train"].interactive is not False
    assert "dreamartist_notice" not in controls


def test_in_neo_the_tab_trains_and_shows_its_previews(host_neo):
    """The real Neo: "FileNotFoundError: ... forge-neo/tmp/tmp....png" when the gallery saved the previews: its
    default temp folder is created only when that setting changes."""
    load_extension(host_neo)
    tab = build_tab(host_neo)
    assert "dreamartist_notice" not in by_elem_id(tab)
    train, dep = click_handler(tab, "dreamartist_train")
    args = click_args(tab, dep, dreamartist_task_id="task(dreamartist-neo)", dreamartist_reference=reference_image(),
                      dreamartist_name="walle", dreamartist_steps=2, dreamartist_width=64, dreamartist_height=64,
                      dreamartist_preview_every=2)
    gallery, _, result = train(*args)
    assert "Type walle in your prompt" in plain_text(result) and len(gallery) == 1
    assert (host_neo.root / "tmp").is_dir()


def test_train_click_trains_a_pair_and_says_what_to_type(host):
    load_extension(host)
    tab = build_tab(host)
    train, dep = click_handler(tab, "dreamartist_train")
    args = click_args(tab, dep, dreamartist_task_id="task(dreamartist-test)", dreamartist_reference=reference_image(),
                      dreamartist_name=" walle ", dreamartist_steps=3, dreamartist_width=64, dreamartist_height=64,
                      dreamartist_preview_every=2)
    gallery, loss, result = train(*args)
    text = plain_text(result)
    assert "Type walle in your prompt; walle-neg is added to the negative prompt automatically." in text
    assert "Trained 3 steps" in text and "walle.pt, walle-neg.pt" in text
    assert (host.embeddings_dir / "walle.pt").is_file() and (host.embeddings_dir / "walle-neg.pt").is_file()
    assert len(gallery) == 1 and gallery[0].size[0] > 0  # the preview made at step 2
    assert "<polyline" in loss and "over 3 steps" in loss and ">step</text>" in loss
    progress = host.module("modules.progress")
    assert "task(dreamartist-test)" in progress.finished_tasks and progress.current_task is None
    assert host.shared.state.job == ""
    from extensions_builtin_compat import embeddings

    assert embeddings.pairs() == ["walle"]


def test_result_line_follows_the_auto_negative_setting(host_v1101):
    load_extension(host_v1101)
    host_v1101.module("modules.script_callbacks").ui_settings_callback()
    host_v1101.shared.opts.set("dreamartist_auto_negative", False)
    tab = build_tab(host_v1101)
    train, dep = click_handler(tab, "dreamartist_train")
    args = click_args(tab, dep, dreamartist_task_id="task(x)", dreamartist_reference=reference_image(),
                      dreamartist_name="robo", dreamartist_steps=1, dreamartist_width=64, dreamartist_height=64,
                      dreamartist_reconstruction=False)
    result = train(*args)[2]
    assert "Type robo in your prompt and robo-neg in your negative prompt." in plain_text(result)


@pytest.mark.parametrize("values, message", [
    (dict(dreamartist_name="walle-neg"), "reserved for the negative partner"),
    (dict(dreamartist_width=100), "multiples of 8"),
    (dict(dreamartist_reference=None), "Upload a reference image"),
    (dict(dreamartist_folder="/no/such/folder"), "Give either an uploaded reference image or a folder path"),
    (dict(dreamartist_mask=reference_image()), None),  # a mask with its image is fine; checked below
])
def test_bad_input_is_one_line_and_writes_nothing(host_v160, values, message):
    load_extension(host_v160)
    tab = build_tab(host_v160)
    train, dep = click_handler(tab, "dreamartist_train")
    values = {"dreamartist_task_id": "task(bad)", "dreamartist_reference": reference_image(),
              "dreamartist_name": "walle", "dreamartist_steps": 1, "dreamartist_width": 64,
              "dreamartist_height": 64, "dreamartist_reconstruction": False, **values}
    result = train(*click_args(tab, dep, **values))[2]
    if message is None:
        assert "Trained 1 step, final loss" in plain_text(result)
        return
    assert "dreamartist-error" in result and message in plain_text(result)
    assert "Traceback" not in result and "Error:" not in result
    assert listing(host_v160.embeddings_dir) == []


def test_collect_references_from_a_folder(host_v160, tmp_path):
    load_extension(host_v160)
    from extensions_builtin_compat.ui_tab import collect_references, config_from_values

    for i in range(2):
        reference_image().save(tmp_path / f"ref{i}.png")
    config = config_from_values({"name": "walle", "width": 64, "height": 64})
    references = collect_references(config, None, f" {tmp_path} ", None)
    assert [tuple(r.pixels.shape) for r in references] == [(3, 64, 64)] * 2
    with pytest.raises(InputError, match="mask"):
        collect_references(config, None, str(tmp_path), reference_image())
    (uploaded,) = collect_references(config, reference_image(), "", reference_image().convert("L"))
    assert uploaded.weight is not None and uploaded.weight.shape == (1, 8, 8)


def test_resume_dropdown_lists_saved_pairs_and_picking_one_fills_their_options(host_v1101):
    from fakehost.checks import write_pair

    write_pair(host_v1101.embeddings_dir, "early")  # on disk before any model has loaded
    load_extension(host_v1101)
    tab = build_tab(host_v1101)
    controls = by_elem_id(tab)
    assert controls["dreamartist_resume_pair"].choices == ["early"]
    from extensions_builtin_compat import jobs
    from extensions_builtin_compat.ui_tab import collect_references, config_from_values

    config = config_from_values({"name": "walle", "steps": 1, "width": 64, "height": 64, "reconstruction": False,
                                 "gamma": "4", "neg_len": 5})
    jobs.run_training(config, collect_references(config, reference_image(), "", None))
    refresh, _ = click_handler(tab, "dreamartist_resume_refresh")
    assert refresh()["choices"] == ["early", "walle"]
    assert controls["dreamartist_resume_refresh"].value == "\u21bb"
    pick = next(fn.fn for fn, dep in zip(tab.fns, tab.dependencies, strict=True)
                if controls["dreamartist_resume_pair"]._id in dep["targets"] and dep["trigger"] == "change")
    names = [f.name for f in sorted(FIELDS, key=lambda f: f.metadata["advanced"])]
    updates = dict(zip(names, pick("walle"), strict=True))
    assert updates["name"]["value"] == "walle" and updates["resume"]["value"] is True
    saved = (updates["gamma"]["value"], updates["neg_len"]["value"], updates["reconstruction"]["value"])
    assert saved == ("4", 5, False)
    assert dict(zip(names, pick(None), strict=True))["resume"]["value"] is False


def test_an_unexpected_failure_is_one_readable_line(host_v160, monkeypatch):
    load_extension(host_v160)
    tab = build_tab(host_v160)
    from extensions_builtin_compat import jobs

    def broken(config, references, on_progress=None):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(jobs, "run_training", broken)
    train, dep = click_handler(tab, "dreamartist_train")
    result = train(*click_args(tab, dep, dreamartist_task_id="task(x)", dreamartist_reference=reference_image(),
                               dreamartist_name="walle", dreamartist_width=64, dreamartist_height=64))[2]
    assert plain_text(result).startswith("Training failed: RuntimeError: CUDA error: device-side assert triggered")
    assert "Traceback" not in result


def test_interrupt_button_interrupts_the_job(host_v1101):
    load_extension(host_v1101)
    interrupt, _ = click_handler(build_tab(host_v1101), "dreamartist_interrupt")
    interrupt()
    assert host_v1101.shared.state.interrupted is True


def test_a_cleared_number_box_is_named_not_replaced_by_a_default(host_v160):
    load_extension(host_v160)
    from extensions_builtin_compat.ui_tab import config_from_values

    with pytest.raises(InputError, match="^Steps is empty.$"):
        config_from_values({"name": "walle", "steps": None})
    assert config_from_values({"name": " walle ", "steps": 12.0}).steps == 12


def test_loss_plot_has_axes_labels_and_a_thinned_line(host_v160):
    load_extension(host_v160)
    from extensions_builtin_compat.ui_render import BOTTOM, CURVE_POINTS, LEFT, RIGHT, TOP, loss_curve_html

    html = loss_curve_html([2.0, 1.0, 3.0])
    points = html.split("points='")[1].split("'")[0].split()
    mid = (LEFT + RIGHT) / 2
    assert points == [f"{LEFT:.1f},{(TOP + BOTTOM) / 2:.1f}", f"{mid:.1f},{BOTTOM:.1f}", f"{RIGHT:.1f},{TOP:.1f}"]
    assert ">step</text>" in html and ">loss</text>" in html and html.count("class='axis'") == 2
    assert [t for t in ("1", "2", "3") if f">{t}</text>" in html] == ["1", "2", "3"]  # ticks on both axes
    assert "first 2.0000, last 3.0000, lowest 1.0000" in html
    many = loss_curve_html([float(i % 7) for i in range(5000)] + [float("nan")])
    assert len(many.split("points='")[1].split("'")[0].split()) == CURVE_POINTS
    assert "over 5001 steps" in many and ">5001</text>" in many
    assert loss_curve_html([1.0]) == "" and loss_curve_html([]) == ""


def test_result_line_escapes_and_reports_an_interrupted_run(host_v160):
    load_extension(host_v160)
    from pathlib import Path

    from extensions_builtin_compat.ui_render import result_html

    html = result_html("walle", "walle-neg", [Path("/e/walle.pt"), Path("/e/walle-neg.pt")], 40, 100, 0.125,
                       "interrupted", True)
    assert plain_text(html) == ("Type walle in your prompt; walle-neg is added to the negative prompt automatically. "
                                "Trained 40 of 100 steps (interrupted), final loss 0.1250. "
                                "Saved: walle.pt, walle-neg.pt.")
    one = result_html("a&b", "a&b-neg", [], 1, 1, None, "", False)
    assert plain_text(one) == ("Type a&amp;b in your prompt and a&amp;b-neg in your negative prompt. "
                               "Trained 1 step. Saved: nothing.")
