"""backend.nn.vae: IntegratedAutoencoderKL (encoder, quant_conv, decoder, post_quant_conv) whose encode samples the
posterior, with Neo's process_in/process_out latent scaling."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL

SCALE = 0.18215


class IntegratedAutoencoderKL(AutoencoderKL):
    def __init__(self):
        super().__init__(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))

    def encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # Neo's encode: posterior.sample()

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def process_in(self, latent):
        return latent * SCALE

    def process_out(self, latent):
        return latent / SCALE
