"""Memory a save of an SDXL identity takes beyond what training already holds; prints figures (not a test).

    python benchmarks/save_memory.py [--stages 5] [--folder DIR]

The identity block at SDXL's widths (clip_l 768 + clip_g 1280; 210 M parameters for 5 stages) after one Adam step:
its values and Adam's two moments are the resume state, 2.5 GB in float32. One process per run: the resident set
before the save, then its peak (Linux VmHWM, reset first) while ``identityfiles.save_identity`` writes the identity
and its state into a new folder (``--folder``: put it on disk, not on a RAM-backed /tmp). Printed: the state's size,
the peak's rise over the resident set before the save, and the two as a ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist import identityfiles  # noqa: E402
from dreamartist.identity import IdentityModule, as_tokens  # noqa: E402

SDXL_WIDTHS = {"clip_l": 768, "clip_g": 1280}


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    raise RuntimeError(f"{field} is not in /proc/self/status")


def trained_block(stages: int) -> tuple[IdentityModule, torch.optim.Optimizer]:
    module = IdentityModule({k: torch.randn(1, w) for k, w in SDXL_WIDTHS.items()}, outputs=2 * stages)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.005)
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return module, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--folder", default=None, help="where to write (default: a new folder under the current one)")
    args = parser.parse_args()
    module, optimizer = trained_block(args.stages)
    params = {k: v.detach() for k, v in module.named_parameters()}
    state = {"step": 1, "optimizer": optimizer.state_dict(), "groups": {"identity": {"live": params, "ema": None}}}
    with torch.no_grad():
        tokens = as_tokens(module(), args.stages, kv_split=True)
    state_bytes = sum(t.numel() * t.element_size() for t in [*params.values(), *(
        v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim)])
    with tempfile.TemporaryDirectory(dir=args.folder or ".") as folder:
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        identityfiles.save_identity(folder, "bench", tokens, {}, {"step": 1}, state)
        rise = _status("VmHWM") - before
    print(f"identity block: {sum(p.numel() for p in params.values()) / 1e6:.0f} M parameters; "
          f"resume state {state_bytes / 2**30:.2f} GiB")
    print(f"save: peak resident memory rose {rise / 2**20:.0f} MiB ({rise / state_bytes:.2f} x the state)")


if __name__ == "__main__":
    main()
