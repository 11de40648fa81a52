"""After training, the webui generates exactly as before: same seed, same prompt, same pixels."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamartist.config import TrainConfig
from dreamartist.images import prepare_reference


def generate(host, prompt: str) -> list[bytes]:
    processed = host.process_images(host.txt2img(prompt=prompt, negative_prompt="blurry", seed=1234, batch_size=2))
    return [np.asarray(image).tobytes() for image in processed.images]


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
def test_generations_with_the_same_seed_are_bit_identical_after_training(host):
    from extensions_builtin_compat import jobs

    image = Image.new("RGB", (64, 64), (40, 160, 90))
    references = [prepare_reference(image, 64, 64)]
    host.load_model("sd1")
    before = generate(host, "a photo of a cat")
    jobs.run_training(TrainConfig(name="walle", steps=3, width=64, height=64, reconstruction=True,
                                  gradient_checkpointing=True, preview_every=2), references)
    assert generate(host, "a photo of a cat") == before
    assert generate(host, "a photo of walle") != before  # the new pair is live in prompts
