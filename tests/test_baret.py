"""BARET on the toy-world model at a few steps: TTIS brings the sampling path back to the image, the branches and the
balanced attention do what the paper says, the cache skips inversion and TTIS, options are checked in one sentence
each, and the `edit` command writes its images or refuses with status 2 and no file."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dreamartist import baret, cli
from dreamartist.attention_control import CROSS, SELF, RowInjection
from dreamartist.backend import POOLED, V_PREDICTION
from dreamartist.baret import InversionCache, balanced_attention, edit, edit_latents, invert
from dreamartist.cli import main
from dreamartist.edit_config import EditConfig, validate
from dreamartist.inversion import EditStopped
from dreamartist.losses import guide
from dreamartist.sampling import ddim_step

TARGET = "a red square on a blue background, striped"
SOURCE = ("circle", "red", "blue", "striped")


@pytest.fixture(scope="module")
def toy():
    pytest.importorskip("diffusers")
    from dreamartist.toyworld import load_backend

    return load_backend(device="cpu")


@pytest.fixture(scope="module")
def photo():
    from dreamartist.toyworld.render import render
    from dreamartist.toyworld.world import Scene

    return render(Scene(*SOURCE), seed=0)


@pytest.fixture(scope="module")
def latents(toy, photo):
    pixels = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    return toy.vae_encode(pixels[None])


@pytest.fixture(scope="module")
def inversion(toy, latents):
    return invert(toy, latents, EditConfig(target=TARGET, steps=6, ttis_iterations=2, ttis_lr=3e-2))


def _count_unet_calls(backend, monkeypatch) -> list[int]:
    rows, original = [], backend.unet

    def counting(latents, timesteps, cond):
        rows.append(latents.shape[0])
        return original(latents, timesteps, cond)

    monkeypatch.setattr(backend, "unet", counting)
    return rows


def _mse(a, b) -> float:
    return float((a - b).pow(2).mean())


# -- TTIS ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inversion_prompt, closer", [("target", 3), ("empty", 2)])
def test_ttis_brings_the_path_back_to_the_image_where_plain_ddim_with_cfg_drifts(toy, latents, inversion_prompt,
                                                                                 closer):
    """From an inversion on the target text or on the empty text (the default; the tuned target text then starts
    further from the path it must follow)."""
    config = EditConfig(target=TARGET, steps=8, ttis_lr=3e-2, inversion_prompt=inversion_prompt)
    plain = invert(toy, latents, config.replace(ttis_iterations=0))
    tuned = invert(toy, latents, config)
    assert plain.iterations == (0,) * 8 and max(tuned.iterations) == 5
    assert all(t < p for t, p in zip(tuned.losses, plain.losses))
    assert tuned.losses[-1] < plain.losses[-1] / closer
    assert _mse(tuned.reconstruction[-1], latents[0]) == pytest.approx(tuned.losses[-1])  # the path ends at z*_0


def test_the_early_stop_threshold_grows_with_the_step_and_a_met_threshold_costs_no_extra_call(toy, latents,
                                                                                             monkeypatch):
    config = EditConfig(target=TARGET, steps=4, threshold_start=0.0, threshold_step=1.0)
    calls = _count_unet_calls(toy, monkeypatch)
    progressive = invert(toy, latents, config)
    assert progressive.iterations == (5, 0, 0, 0)  # step 0 never meets 0; every later step meets 1 at once
    # inversion 4; step 0: uncond + 5 tuned + 1 to advance; steps 1-3: uncond + 1 whose output advances too
    assert len(calls) == 4 + 7 + 3 * 2
    met = invert(toy, latents, config.replace(threshold_start=1.0))
    plain = invert(toy, latents, config.replace(ttis_iterations=0))
    assert met.iterations == (0,) * 4
    torch.testing.assert_close(met.reconstruction, plain.reconstruction)
    torch.testing.assert_close(met.tuned, plain.tuned)


# -- the branches and balanced attention ------------------------------------------------------------------------
def test_alpha_one_gives_the_same_edit_as_leaving_the_transition_branch_out(toy, inversion, monkeypatch):
    rigid = EditConfig(target=TARGET, steps=6, rigid=True)
    calls = _count_unet_calls(toy, monkeypatch)
    with_branch = edit_latents(toy, inversion, rigid, transition=True, branch_images=True)
    without = edit_latents(toy, inversion, rigid)
    by_alpha = edit_latents(toy, inversion, rigid.replace(rigid=False, alpha_start=1.0, alpha_end=1.0))
    # rows x CFG per step (tau_SA 0.3: steps 0-1, tau_CA 0.6: steps 0-3): the reconstruction where the edit reads it
    # (its K/V; its map too when the transition is left out), the transition to the end for its image
    assert calls == [6, 6, 4, 4, 4, 4] + [4, 4, 4, 4, 2, 2] * 2
    torch.testing.assert_close(with_branch[0], without[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_alpha[0], without[0])
    # transition == reconstruction: the same DDIM process, batched with other rows against TTIS's one-row path
    torch.testing.assert_close(with_branch[2], with_branch[1], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(without[2], without[1])
    with pytest.raises(ValueError, match="the inversion was made for"):
        edit_latents(toy, inversion, rigid.replace(cfg=5.0))


def test_a_branch_runs_only_in_the_steps_that_read_it_and_the_reconstruction_walks_ttis_path(toy, inversion,
                                                                                             monkeypatch):
    config = EditConfig(target=TARGET, steps=6)  # tau_SA 0.3: steps 0-1; tau_CA 0.6: steps 0-3
    seen, original = [], toy.unet

    def spy(latents, timesteps, cond):
        out = original(latents, timesteps, cond)
        seen.append((latents, int(timesteps[0]), out))
        return out

    monkeypatch.setattr(toy, "unet", spy)
    edited, reconstruction, transition = edit_latents(toy, inversion, config)
    assert [len(x) // 2 for x, _, _ in seen] == [3, 3, 2, 2, 1, 1]  # rows per CFG half
    torch.testing.assert_close(reconstruction, inversion.reconstruction[-1:])
    assert transition is None  # it stopped with its map window
    # where the reconstruction's rows ran (first of each half), their guided DDIM step lands on TTIS's next latent
    abar, gamma = toy.alphas_cumprod.float(), torch.full((1,), config.cfg)
    for i, (x, t, out) in enumerate(seen[:2]):
        guided = guide(out[0:1], out[3:4], gamma)
        after = ddim_step(toy.prediction_type, guided, x[0:1], abar[t], abar[inversion.timesteps[i + 1]])
        torch.testing.assert_close(after, inversion.reconstruction[i + 1:i + 2], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="branch_images=True"):
        baret.decode(toy, baret.EditResult(edited, reconstruction, transition, inversion, False), branches=True)
    seen.clear()
    kept = edit_latents(toy, inversion, config, branch_images=True)
    assert [len(x) // 2 for x, _, _ in seen] == [3, 3, 2, 2, 2, 2]
    torch.testing.assert_close(kept[0], edited, atol=1e-5, rtol=1e-5)  # the same edit
    assert not torch.allclose(kept[2], edited, atol=1e-3)


def test_the_transition_is_the_plain_target_edit_at_alpha_zero_and_bam_changes_the_edit(toy, inversion):
    config = EditConfig(target=TARGET, steps=6)
    free = config.replace(alpha_start=0.0, alpha_end=0.0, tau_sa=0.0, tau_ca=0.0)
    edited, reconstruction, transition = edit_latents(toy, inversion, free, branch_images=True)
    torch.testing.assert_close(transition, edited, atol=1e-5, rtol=1e-5)  # same conditioning, no injection
    assert not torch.allclose(transition, reconstruction, atol=1e-3)
    balanced, _, _ = edit_latents(toy, inversion, config)
    assert not torch.allclose(balanced, edited, atol=1e-3)


class ReplacementCheck(RowInjection):
    """BARET's controller, checked against the rows the paper names: at each site every row must hold exactly its
    expected source row's K/V (or probabilities), and probabilities are formed only inside the map's window."""

    def __init__(self, inner: RowInjection, expected):
        super().__init__(inner.injections)
        self.expected, self.seen, self.explicit = expected, [], set()

    def _check(self, site, kind, before, after):
        sources = self.expected(kind, site.step)
        for i, row in enumerate(site.rows):
            assert torch.equal(after[i], before[site.row(sources.get(row, row))]), (kind, site.step, row)
        self.seen.append((kind, site.step))

    def keys_values(self, site, query, key, value):
        new_key, new_value = super().keys_values(site, query, key, value)
        if site.kind == SELF:
            self._check(site, SELF, key, new_key)
            self._check(site, SELF, value, new_value)
        return new_key, new_value

    def probabilities(self, site, probs):
        self.explicit.add(site.step)
        new = super().probabilities(site, probs)
        self._check(site, CROSS, probs, new)
        return new


@pytest.mark.parametrize("rigid", [False, True])
def test_bam_gives_the_edit_the_reconstructions_kv_and_the_transitions_map_in_their_windows(toy, inversion,
                                                                                           monkeypatch, rigid):
    config = EditConfig(target=TARGET, steps=6, rigid=rigid)  # tau_SA 0.3: steps 0-1; tau_CA 0.6: steps 0-3
    map_source = baret.RECONSTRUCTION if rigid else baret.TRANSITION

    def expected(kind, step):
        if kind == SELF and step < 2:
            return {(baret.EDITING, part): (baret.RECONSTRUCTION, part) for part in (baret.UNCOND, baret.COND)}
        if kind == CROSS and step < 4:
            return {(baret.EDITING, baret.COND): (map_source, baret.COND)}
        return {}

    checks = []

    def checked(*args):
        checks.append(ReplacementCheck(balanced_attention(*args), expected))
        return checks[-1]

    monkeypatch.setattr(baret, "balanced_attention", checked)
    edit_latents(toy, inversion, config)
    (check,) = checks
    assert check.explicit == {0, 1, 2, 3}
    assert {step for kind, step in check.seen if kind == SELF} == set(range(6))


# -- the cache --------------------------------------------------------------------------------------------------
def test_a_re_edit_with_other_alpha_and_tau_skips_inversion_and_ttis_and_gives_the_same_result(toy, latents,
                                                                                              monkeypatch):
    config = EditConfig(target=TARGET, steps=4, ttis_iterations=2, ttis_lr=3e-2)
    other = config.replace(alpha_start=0.6, tau_sa=0.5, tau_ca=0.8)
    uncached = edit(toy, latents, other)
    cache = InversionCache()
    calls = _count_unet_calls(toy, monkeypatch)
    first = edit(toy, latents, config, cache=cache)
    inverting = len(calls) - 4
    assert not first.reused and inverting > 4 * 2
    calls.clear()
    again = edit(toy, latents, other, cache=cache)
    assert again.reused and calls == [6, 6, 4, 4]  # the editing pass alone (tau_SA 0.5: the reconstruction in 2)
    torch.testing.assert_close(again.edited, uncached.edited)
    torch.testing.assert_close(again.transition, uncached.transition)
    calls.clear()
    assert not edit(toy, latents, config.replace(target="a red star on a blue background"), cache=cache).reused
    assert not edit(toy, latents, config.replace(cfg=5.0), cache=cache).reused
    assert not edit(toy, latents + 0.01, config, cache=cache).reused
    assert len(cache) == 4


# -- options, progress, interruption ----------------------------------------------------------------------------
def _one_sentence(text: str) -> bool:
    return text.endswith(".") and "\n" not in text and not re.search(r"[.!?] +[A-Z]", text)


def test_defaults_are_the_papers_and_each_bad_value_gets_one_sentence():
    config = EditConfig(target="  a dog lying down ")
    assert config.target == "a dog lying down"
    assert (config.steps, config.cfg, config.alpha_start, config.alpha_end, config.tau_sa, config.tau_ca,
            config.ttis_iterations, config.ttis_lr, config.rigid) == (50, 7.5, 0.8, 0.1, 0.3, 0.6, 5, 1e-3, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3
    with pytest.raises(Exception) as empty:
        EditConfig(target="   ")
    assert str(empty.value) == "The target text is empty; describe what the edited image should show."
    bad = dict(steps=0, cfg=0.5, alpha_start=1.5, tau_sa=-0.1, ttis_iterations=2.5, sa_layers="middle",
               inversion_prompt="caption", threshold_step=float("nan"))
    for name, value in bad.items():
        with pytest.raises(Exception) as error:
            EditConfig(target="x", **{name: value})
        assert _one_sentence(str(error.value)), str(error.value)
    with pytest.raises(Exception) as window:
        EditConfig(target="x", sa_start=0.5, tau_sa=0.3)
    assert _one_sentence(str(window.value)) and "self-attention injection starts at 0.5" in str(window.value)
    with pytest.raises(Exception) as several:
        EditConfig(target="x", steps=0, cfg=99.0)
    assert str(several.value).count(".") >= 2 and "\n" not in str(several.value)
    object.__setattr__(config, "ca_start", 0.9)  # validate() itself, on a config that skipped construction
    problems = validate(config)
    assert len(problems) == 1 and _one_sentence(problems[0])


def test_progress_walks_the_three_phases_and_a_stop_request_ends_the_edit_cleanly(toy, latents):
    config = EditConfig(target=TARGET, steps=3, ttis_iterations=1)
    seen = []
    edit(toy, latents, config, on_progress=seen.append)
    assert [(p.phase, p.step, p.steps) for p in seen] == [(phase, i, 3) for phase in ("inversion", "ttis", "editing")
                                                         for i in (1, 2, 3)]
    assert all(p.loss is not None for p in seen if p.phase == "ttis")
    processors = dict(toy.unet_model.attn_processors)
    for stop_after in (4, 7):  # during TTIS, then during the edit
        cache, seen = InversionCache(), []
        with pytest.raises(EditStopped, match="^The edit was stopped before it finished.$"):
            edit(toy, latents, config, cache=cache, on_progress=seen.append,
                 should_stop=lambda: len(seen) >= stop_after)  # noqa: B023
        assert len(seen) == stop_after and len(cache) == (0 if stop_after < 6 else 1)
        assert all(toy.unet_model.attn_processors[k] is v for k, v in processors.items())


# -- other model kinds -------------------------------------------------------------------------------------------
def test_v_prediction_and_sdxl_conditioning(monkeypatch):
    pytest.importorskip("diffusers")
    import tiny_sdxl

    from dreamartist.standalone import build_random_backend

    config = EditConfig(target="a photo of a cat", steps=3, ttis_iterations=2, cfg=2.0)
    v_model = build_random_backend(seed=1, device="cpu")
    v_model.prediction_type = V_PREDICTION
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = edit(v_model, z, config)
    assert result.edited.shape == z.shape and torch.isfinite(result.edited).all()
    assert result.inversion.losses[-1] < invert(v_model, z, config.replace(ttis_iterations=0)).losses[-1]
    sdxl = tiny_sdxl.backend()
    pooled_rows = []
    original = sdxl.unet
    monkeypatch.setattr(sdxl, "unet", lambda x, t, cond: pooled_rows.append((x.shape[0], cond.extras[POOLED].shape[0]))
                        or original(x, t, cond))
    result = edit(sdxl, z, config)
    assert torch.isfinite(result.edited).all()
    assert pooled_rows and all(latent_rows == rows for latent_rows, rows in pooled_rows)
    assert (6, 6) in pooled_rows


# -- the command line -------------------------------------------------------------------------------------------
@pytest.fixture
def command(toy, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_backend", lambda *args: toy)

    def run(*args) -> tuple[int, str, str]:
        code = main(["edit", *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_the_edit_command_writes_the_image_and_its_branches(command, photo, tmp_path):
    source = tmp_path / "in.png"
    photo.save(source)
    output = tmp_path / "out" / "edited.png"
    code, out, err = command("--image", source, "--target", TARGET, "--output", output, "--steps", 2,
                             "--ttis-iterations", 1, "--save-branches")
    assert code == 0, err
    assert sorted(p.name for p in output.parent.iterdir()) == ["edited-reconstruction.png", "edited-transition.png",
                                                               "edited.png"]
    with Image.open(output) as written:
        assert written.size == (64, 64)
        assert written.text["parameters"].startswith(TARGET + "\nNegative prompt: \nSteps: 2, Sampler: DDIM")


@pytest.mark.parametrize("case", ["unreadable", "empty target", "odd size", "bad knob", "bad suffix", "stopped"])
def test_the_edit_command_refuses_bad_input_in_one_line_and_writes_nothing(command, photo, tmp_path, monkeypatch,
                                                                         case):
    source, output = tmp_path / "in.png", tmp_path / "edited.png"
    photo.save(source)
    args = ["--image", source, "--target", TARGET, "--output", output, "--steps", 2, "--ttis-iterations", 0]
    expected = {"unreadable": "is not an image file", "empty target": "The target text is empty",
                "odd size": "is 70x66 pixels", "bad knob": "tau_SA", "bad suffix": "must end in"}.get(case)
    if case == "unreadable":
        source.write_bytes(b"not an image")
    elif case == "empty target":
        args[3] = " "
    elif case == "odd size":
        photo.resize((70, 66)).save(source)
    elif case == "bad knob":
        args += ["--tau-sa", "1.5"]
    elif case == "bad suffix":
        args[5] = output = tmp_path / "edited.gif"
    elif case == "stopped":
        monkeypatch.setattr(cli, "_soft_interrupt", lambda: _stopping())
    code, out, err = command(*args)
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
    if case == "stopped":
        assert code == cli.EXIT_INTERRUPTED and "nothing was written" in out
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dreamartist: error:") and expected in lines[0], err


class _stopping:
    """``_soft_interrupt`` as after a first Ctrl-C."""

    def __enter__(self):
        return [True]

    def __exit__(self, *exc):
        return False
