"""The DreamArtist objective against hand computations: eq. 3, the gamma schedules, eq. 5, v-prediction."""
import math

import pytest
import torch

from dreamartist import losses
from dreamartist.errors import InputError
from dreamartist.gamma import parse_gamma
from dreamartist.objective import joint_loss


def test_eq3_loss_matches_hand_computation():
    eps_n = torch.tensor([1.0, -2.0, 0.5, 0.0]).view(1, 4, 1, 1)
    eps_p = torch.tensor([2.0, 0.0, 0.5, -1.0]).view(1, 4, 1, 1)
    noise = torch.tensor([4.0, 3.0, 0.0, -3.0]).view(1, 4, 1, 1)
    guided = losses.guide(eps_n, eps_p, torch.tensor([3.0]))
    # eps_hat = n + 3 (p - n) = [4, 4, 0.5, -3]; (noise - eps_hat)^2 = [0, 1, 0.25, 0]; mean = 1.25 / 4
    assert guided.flatten().tolist() == [4.0, 4.0, 0.5, -3.0]
    assert losses.da_loss(guided, noise).item() == pytest.approx(0.3125)


def test_gamma_broadcasts_per_sample():
    eps_n = torch.zeros(2, 4, 2, 2)
    eps_p = torch.ones(2, 4, 2, 2)
    guided = losses.guide(eps_n, eps_p, torch.tensor([2.0, 5.0]))
    assert torch.all(guided[0] == 2.0) and torch.all(guided[1] == 5.0)


def test_weighted_loss():
    guided = torch.zeros(1, 2, 1, 2)
    goal = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    weight = torch.tensor([[[[0.0, 5.0]]]])  # (1,1,1,2) broadcast over channels
    # weighted squares: [0, 20, 0, 80] -> mean 25
    assert losses.da_loss(guided, goal, weight).item() == pytest.approx(25.0)


@pytest.mark.parametrize("text,t,expected", [
    ("3", 500, 3.0),
    ("1.5-3.0", 0, 1.5),
    ("1.5-3.0", 999, 3.0),
    ("1.5-3.0", 333, 1.5 + 1.5 * 333 / 999),
    ("1.5-3.0:cos", 333, 1.5 + 1.5 * math.sin(333 / 999 * math.pi / 2)),
    ("1.5-3.0:cos2", 333, 1.5 + 1.5 * (1 - math.cos(333 / 999 * math.pi / 2))),
    ("2e0-4E0:ln", 999, 4.0),
])
def test_gamma_schedules(text, t, expected):
    schedule = parse_gamma(text)
    assert schedule(torch.tensor([t]), 1000).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("text", ["", "abc", "1.5-", "3:cos", "1-2:sqrt", "__import__('os')", "-3", "0", "1-2-3",
                                  "1.5-3.0:torch.sqrt(rate)", "nan", "inf"])
def test_bad_gamma_is_a_clear_error(text):
    with pytest.raises(InputError, match="Gamma"):
        parse_gamma(text)


def test_v_prediction_target():
    z0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    abar = torch.tensor([0.9, 0.2]).view(-1, 1, 1, 1)
    v = losses.target("v_prediction", z0, noise, abar)
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * z0)
    z_t = losses.add_noise(z0, noise, abar)
    # a perfect v prediction recovers both z0 and eps
    assert torch.allclose(losses.predict_z0("v_prediction", v, z_t, abar), z0, atol=1e-5)
    assert torch.allclose(losses.predict_eps("v_prediction", v, z_t, abar), noise, atol=1e-5)


def test_eq5_recovers_z0_exactly_from_the_true_noise():
    z0, noise = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    abar = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64).view(-1, 1, 1, 1)
    z_t = losses.add_noise(z0, noise, abar)
    assert torch.allclose(losses.predict_z0("epsilon", noise, z_t, abar), z0, atol=1e-10)


def test_reconstruction_loss_is_l1():
    decoded = torch.tensor([[[[0.5, -1.0]]]])
    pixels = torch.tensor([[[[0.0, 1.0]]]])
    assert losses.reconstruction_loss(decoded, pixels).item() == pytest.approx(1.25)


def test_a_training_step_computes_eq3_on_one_unet_call_with_shared_t_and_noise(random_backend, tmp_path, monkeypatch):
    """The trainer's micro-batch: S^n rows then S^p rows in one call, same z_t and t on both, gamma(t) per row."""
    from PIL import Image

    from dreamartist.config import TrainConfig
    from dreamartist.images import prepare_reference
    from dreamartist.trainer import Trainer

    backend_type = type(random_backend)
    calls = {}

    def encode(self, prompts, words=None, branches=()):
        calls["prompts"], calls["branches"] = list(prompts), branches
        return original_encode(self, prompts, words, branches)

    def unet(self, latents, timesteps, cond):
        out = original_unet(self, latents, timesteps, cond)
        calls.setdefault("unet", []).append((latents.detach(), timesteps, out.detach()))
        return out

    def da_loss(guided, goal, weight=None):
        calls["guided"], calls["goal"] = guided.detach(), goal.detach()
        return original_da_loss(guided, goal, weight)

    original_encode, original_unet, original_da_loss = backend_type.encode, backend_type.unet, losses.da_loss
    monkeypatch.setattr(backend_type, "encode", encode)
    monkeypatch.setattr(backend_type, "unet", unet)
    monkeypatch.setattr(losses, "da_loss", da_loss)
    config = TrainConfig(name="walle", width=64, height=64, batch_size=2, gamma="1.5-3.0", reconstruction=False,
                         init_words="robot")
    references = [prepare_reference(Image.new("RGB", (64, 64), (200, 120, 40)), 64, 64, caption="box")]
    trainer = Trainer(random_backend, config, references, tmp_path)
    trainer._start()
    with random_backend.training(), torch.no_grad():
        trainer.latents = [random_backend.vae_encode(r.pixels.unsqueeze(0)) for r in references]
        loss = joint_loss([trainer.part()])[0]

    (latents, timesteps, out), = calls["unet"]
    assert calls["branches"] == ("neg", "neg", "pos", "pos")
    neg_text, pos_text = calls["prompts"][:2], calls["prompts"][2:]
    assert [t.replace("walle-neg", "walle") for t in neg_text] == pos_text and all("walle-neg" in t for t in neg_text)
    assert torch.equal(latents[:2], latents[2:]) and torch.equal(timesteps[:2], timesteps[2:])
    t = timesteps[:2]
    abar = random_backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    z0 = trainer.latents[0].expand(2, -1, -1, -1)
    torch.testing.assert_close(latents[:2], abar.sqrt() * z0 + (1 - abar).sqrt() * calls["goal"])  # goal is eps
    gamma = (1.5 + 1.5 * t.float() / 999).view(-1, 1, 1, 1)
    torch.testing.assert_close(calls["guided"], out[:2] + gamma * (out[2:] - out[:2]))
    assert loss.item() == pytest.approx(((calls["guided"] - calls["goal"]) ** 2).mean().item(), rel=1e-6)
