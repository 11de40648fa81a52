"""The DreamArtist objective against hand computations: eq. 3, the gamma schedules, eq. 5, v-prediction."""
import math

import pytest
import torch

from dreamartist import losses
from dreamartist.errors import InputError
from dreamartist.gamma import parse_gamma


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
