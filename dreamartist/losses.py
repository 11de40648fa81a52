"""The DreamArtist objective (paper sec. 4): guided prediction, eq. 3 loss, eq. 5 z0 estimate, eq. 6.

Shapes: latents (B,C,h,w); ``abar`` is alphas_cumprod[t] broadcast as (B,1,1,1); ``gamma`` is (B,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import EPSILON, V_PREDICTION


def add_noise(z0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
    return abar.sqrt() * z0 + (1 - abar).sqrt() * noise


def guide(out_neg: torch.Tensor, out_pos: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """eps_hat = eps(z_t, S^n) + gamma * (eps(z_t, S^p) - eps(z_t, S^n)): the CFG combination of eq. 3."""
    return out_neg + gamma.view(-1, 1, 1, 1) * (out_pos - out_neg)


def target(prediction_type: str, z0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """What the model is trained to output: eps, or v = sqrt(abar) eps - sqrt(1 - abar) z_0."""
    if prediction_type == EPSILON:
        return noise
    if prediction_type == V_PREDICTION:
        return abar.sqrt() * noise - (1 - abar).sqrt() * z0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def predict_z0(prediction_type: str, output: torch.Tensor, z_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """z_hat_0 from a (guided) model output: eq. 5 for eps; z_0 = sqrt(abar) z_t - sqrt(1 - abar) v for v."""
    if prediction_type == EPSILON:
        return (z_t - (1 - abar).sqrt() * output) / abar.sqrt()
    if prediction_type == V_PREDICTION:
        return abar.sqrt() * z_t - (1 - abar).sqrt() * output
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def da_loss(guided: torch.Tensor, goal: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_da = mean || goal - guided ||^2 (eq. 3), optionally weighted per latent pixel (B,1,h,w)."""
    squared = (guided.float() - goal.float()) ** 2
    if weight is not None:
        squared = squared * weight
    return squared.mean()


def reconstruction_loss(decoded: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """L_rec = | D(z_hat_0) - x |_1 in pixel space [-1, 1] (eq. 6), averaged over pixels."""
    return F.l1_loss(decoded.float(), pixels.float())


def predict_eps(prediction_type: str, output: torch.Tensor, z_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """eps from a model output: itself for eps models; sqrt(abar) v + sqrt(1 - abar) z_t for v models."""
    if prediction_type == EPSILON:
        return output
    if prediction_type == V_PREDICTION:
        return abar.sqrt() * output + (1 - abar).sqrt() * z_t
    raise ValueError(f"unknown prediction type {prediction_type!r}")
