"""ldm_patched's transformer block as Forge Classic writes it: each residual added in place onto the x its norm has
just read (``n = self.norm1(x) ... x += n``), which fails a backward pass as it is. reForge adds out of place (the
stand-in reForge keeps ldm's block); the stand-in Classic swaps this class in at load."""
from __future__ import annotations

from ldm.models import BasicTransformerBlock as _LdmBlock


class BasicTransformerBlock(_LdmBlock):
    def _forward(self, x, encoder_hidden_states=None, **kwargs):
        n = self.norm1(x)
        n = self.attn1(n, context=None)
        x += n
        n = self.norm2(x)
        n = self.attn2(n, context=encoder_hidden_states)
        x += n
        x = self.ff(self.norm3(x)) + x
        return x
