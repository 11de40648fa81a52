"""Null-text inversion (dreamartist.null_text) on the toy-world model at a few steps: tuning the null text brings the
guided path back to the image where plain DDIM inversion with CFG drifts, and sampling with the caption walks that
tuned path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamartist import null_text
from dreamartist.baret import invert
from dreamartist.edit_config import EditConfig

CAPTION = "a red circle on a blue background, striped"


@pytest.fixture(scope="module")
def toy():
    pytest.importorskip("diffusers")
    from dreamartist.toyworld import load_backend

    return load_backend(device="cpu")


@pytest.fixture(scope="module")
def latents(toy):
    from dreamartist.toyworld.render import render_array
    from dreamartist.toyworld.world import Scene

    pixels = torch.from_numpy(render_array(Scene("circle", "red", "blue", "striped"), 0).astype(np.float32))
    return toy.vae_encode((pixels / 127.5 - 1).permute(2, 0, 1)[None])


def test_tuning_the_null_text_brings_the_path_back_to_the_image(toy, latents):
    tuned = null_text.invert(toy, latents, CAPTION, steps=6, cfg=4.0, iterations=5)
    plain = null_text.invert(toy, latents, CAPTION, steps=6, cfg=4.0, iterations=0)
    assert plain.iterations == (0,) * 6 and 6 < sum(tuned.iterations) <= 30
    assert tuned.losses[-1] < plain.losses[-1] / 2
    # the inversion is BARET's own (the caption in the target's place), untouched by the tuning
    ddim = invert(toy, latents, EditConfig(target=CAPTION, steps=6, cfg=4.0, ttis_iterations=0,
                                           inversion_prompt="target"))
    torch.testing.assert_close(tuned.trajectory, ddim.trajectory)
    torch.testing.assert_close(plain.reconstruction[-1], ddim.reconstruction[-1], atol=1e-5, rtol=1e-5)
    # sampling with the caption and the tuned null texts is the tuned path; another text goes elsewhere
    torch.testing.assert_close(null_text.sample(toy, tuned, CAPTION)[0], tuned.reconstruction[-1], atol=1e-4,
                               rtol=1e-4)
    edited = null_text.sample(toy, tuned, "a red square on a blue background, striped")
    assert float((edited[0] - tuned.reconstruction[-1]).abs().mean()) > 0.01
