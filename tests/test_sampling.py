"""DDIM sampling with CFG over a Backend: the webui's timesteps, determinism, the pair on both sides."""
import torch

from dreamartist.sampling import ddim_timesteps, grid, sample


def test_ddim_timesteps_use_the_webuis_spacing():
    assert ddim_timesteps(1000, 50)[:2] == [981, 961] and ddim_timesteps(1000, 50)[-1] == 1
    assert ddim_timesteps(1000, 3) == [667, 334, 1]
    assert all(0 <= t < 1000 for n in (1, 7, 999, 1000, 2000) for t in ddim_timesteps(1000, n))


def test_same_seed_same_image_and_words_change_it(random_backend):
    words = {"walle": {"clip_l": torch.randn(3, 32)}, "walle-neg": {"clip_l": torch.randn(3, 32)}}
    a = sample(random_backend, "a walle", "walle-neg", words, guidance=3, steps=4, width=64, height=64, seed=5)
    b = sample(random_backend, "a walle", "walle-neg", words, guidance=3, steps=4, width=64, height=64, seed=5)
    c = sample(random_backend, "a walle", "", words, guidance=3, steps=4, width=64, height=64, seed=5)
    assert a[0].tobytes() == b[0].tobytes() and a[0].tobytes() != c[0].tobytes()
    assert grid(a + b + c).size == (128, 128)


def test_rows_are_negative_then_positive(random_backend, monkeypatch):
    seen = []
    original = type(random_backend).encode

    def spy(self, prompts, words=None, branches=()):
        seen.append((prompts, branches))
        return original(self, prompts, words, branches)

    monkeypatch.setattr(type(random_backend), "encode", spy)
    sample(random_backend, "pos", "neg", guidance="1.5-3.0:cos", steps=2, width=64, height=64, batch=2)
    assert seen == [(["neg", "neg", "pos", "pos"], ("neg", "neg", "pos", "pos"))]
