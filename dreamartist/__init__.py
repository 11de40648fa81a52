"""DreamArtist: one-shot positive-negative prompt tuning for Stable Diffusion (pure-torch core)."""

__version__ = "0.1.0"
