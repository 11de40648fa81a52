"""modules.sd_hijack_optimizations: cross-attention optimisations replace CrossAttention.forward at class level."""
from __future__ import annotations

from diffusers.models.attention_processor import AttnProcessor2_0
from ldm.models import CrossAttention

_sdp = AttnProcessor2_0()


def scaled_dot_product_attention_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None,
                                         **kwargs):
    return _sdp(self, hidden_states, encoder_hidden_states, attention_mask)


class SdOptimization:
    name: str = ""
    label: str | None = None
    cmd_opt: str | None = None
    priority: int = 0

    def title(self) -> str:
        return self.name if self.label is None else f"{self.name} - {self.label}"

    def is_available(self) -> bool:
        return True

    def apply(self) -> None:
        pass

    def undo(self) -> None:
        if "forward" in CrossAttention.__dict__:
            del CrossAttention.forward  # back to the plain attention the class inherits


class SdOptimizationSdp(SdOptimization):
    name = "sdp"
    label = "scaled dot product"
    cmd_opt = "opt_sdp_attention"
    priority = 80

    def apply(self) -> None:
        CrossAttention.forward = scaled_dot_product_attention_forward
