"""The host's share of the adapters' cost, which is what a GPU waits for at a small batch; prints ratios.

    python benchmarks/host_overhead.py [--calls 400] [--rounds 7]

On a GPU a two-row step is bound by the host: Python, autograd and the dispatch of each operation, each followed
by a kernel launch. A LayerNorm-fed Linear of width 8 on two rows of 4 tokens does next to no arithmetic, so its
time on a CPU is that host work alone. Rows, each timed over --calls calls per round, in turn, the median taken:
- training: the layer's forward and backward with no adapters, then with phi^n and phi^p on the [S^n; S^p] rows;
- sampling: a no-gradient call likewise, the adapters on the [cond; uncond] rows.
tests/test_adapters.py counts the kernels the adapters add per layer.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamartist.adapters import Lora, installed, row_labels  # noqa: E402


def layer_call(adapters_on: bool, training: bool, stack: contextlib.ExitStack) -> Callable[[], None]:
    """One call of the layer as a training step makes it (the adapters installed for the step) or as a sampling
    step does (installed once per generation, here once for the run)."""
    torch.manual_seed(0)
    norm, layer = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8).requires_grad_(False)
    x = torch.randn(2, 4, 8, requires_grad=training)
    pn = {branch: {"l": Lora(torch.randn(1, 8).requires_grad_(training), torch.zeros(8, 1).requires_grad_(training),
                             1.0)} for branch in ("neg", "pos")}
    adapters = {branch: (adapter, 1.0) for branch, adapter in pn.items()} if adapters_on else {}
    if not training:
        stack.enter_context(installed({"l": layer}, adapters))

        def sample():
            with torch.no_grad(), row_labels(["neg", "pos"]):
                layer(norm(x))
        return sample

    def train():
        with installed({"l": layer}, adapters, dropout=0.1, training=True), row_labels(["neg", "pos"]):
            out = layer(norm(x))
        out.sum().backward()
    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400, help="calls per row and round (default: 400)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median is taken (default: 7)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stack = contextlib.ExitStack()
    rows = {(mode, on): layer_call(on, mode == "training", stack) for mode in ("training", "sampling")
            for on in (False, True)}
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in rows}
    for _ in range(args.rounds):
        for key, call in rows.items():
            call()
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            times[key].append((time.perf_counter() - start) / args.calls)
    print(f"torch {torch.__version__}, one thread, {args.calls} calls x {args.rounds} rounds, median")
    for mode in ("training", "sampling"):
        bare, adapted = (statistics.median(times[mode, on]) * 1e6 for on in (False, True))
        print(f"{mode}: {bare:.0f} us bare, {adapted:.0f} us with both branches' adapters: +{adapted - bare:.0f} us "
              f"per layer ({adapted / bare:.2f}x)")


if __name__ == "__main__":
    main()
