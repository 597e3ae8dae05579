"""What the first pass's band costs where it misses: the exact top-k selection alone
(recipe/library/_select.py, CPU kernels), in memory, over deltas alike along the tensor and
over two kinds that vary along it, with the band and without (band_cap=0: the histogram passes
a GPU takes). No reads, no output: the selection's own work, per element of one input.

    .venv/bin/python benchmarks/band_miss.py [--numel 16777216] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from astolfo_dist.recipe.library._select import Selection

CHUNK = 1 << 19  # the engine's default chunk (2 MiB of float32)


def cases(numel: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(numel, generator=gen)
    half = numel // 2
    return {
        "even: deltas alike along the tensor": torch.randn(numel, generator=gen),
        "drift: the deltas' scale grows 4x along the tensor": torch.randn(numel, generator=gen)
        * torch.linspace(1, 4, numel),
        "late shift: the deltas triple after the middle": torch.cat(
            [torch.randn(half, generator=gen), 3 * torch.randn(numel - half, generator=gen)]),
    }, base


def select(x: torch.Tensor, base: torch.Tensor, k: int, band_cap: int | None) -> tuple[float, int]:
    numel = x.numel()
    sel = Selection(numel, k, inert_zeros=True, band_cap=band_cap)
    t0 = time.perf_counter()
    while not sel.done:
        for s in range(0, numel, CHUNK):
            if sel.wants(s, CHUNK):
                sel.feed(x[s : s + CHUNK] + base[s : s + CHUNK], s, base=base[s : s + CHUNK])
        sel.end_pass()
    return time.perf_counter() - t0, sel.result.passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    deltas, base = cases(args.numel)
    k = args.numel // 5
    lines = [f"Band or not, one selection of k = numel/5 over {args.numel} float32 deltas in chunks of {CHUNK}, "
             f"best of {args.repeats}; {platform.processor() or platform.machine()}, torch {torch.__version__}. "
             "ns per element include adding the base back each pass (the input as the engine reads it).", "",
             "| deltas | band | passes | ms | ns per element |", "|---|---|---:|---:|---:|"]
    for name, d in deltas.items():
        for cap, label in ((None, "on"), (0, "off")):
            seconds, passes = min(select(d, base, k, cap) for _ in range(args.repeats))
            lines.append(f"| {name} | {label} | {passes} | {seconds * 1e3:.1f} | {seconds / args.numel * 1e9:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
