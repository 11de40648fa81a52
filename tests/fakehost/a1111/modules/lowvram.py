"""modules.lowvram: --lowvram/--medvram bookkeeping (the stand-in moves nothing)."""
from __future__ import annotations

from modules import shared


def is_needed(sd_model) -> bool:
    return bool(shared.cmd_opts.lowvram or shared.cmd_opts.medvram
                or (shared.cmd_opts.medvram_sdxl and getattr(sd_model, "is_sdxl", False)))


def is_enabled(sd_model) -> bool:
    return bool(getattr(sd_model, "lowvram", False))


def apply(sd_model) -> None:
    sd_model.lowvram = is_needed(sd_model)


def send_everything_to_cpu() -> None:
    pass
