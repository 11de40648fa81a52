"""backend.modules.k_model: KModel (the diffusion model frozen, its predictor holding the schedule)."""
from __future__ import annotations

import torch


class Prediction(torch.nn.Module):
    def __init__(self, prediction_type: str = "epsilon", steps: int = 1000):
        super().__init__()
        self.prediction_type = prediction_type
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0).float())


class KModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, predictor: Prediction):
        super().__init__()
        self.computation_dtype = torch.float32
        self.diffusion_model = model
        self.diffusion_model.eval()
        self.diffusion_model.requires_grad_(False)
        self.predictor = predictor
