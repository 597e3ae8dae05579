"""Synthetic checkpoints with real model layouts (SD1.5, SDXL), for the demo, the tests and
the benchmarks. Nothing is downloaded: the layouts ship with the package."""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from .formats.dtypes import DTYPES

LAYOUTS = ("sd15", "sdxl")


@cache
def load_layout(name: str) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(key, shape, dtype) of every tensor of a real checkpoint of that architecture."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    text = resources.files("astolfo_dist.layouts").joinpath(f"{name}_layout.json").read_text()
    return tuple((k, tuple(shape), dt) for k, shape, dt in json.loads(text)["tensors"])


def scaled_shape(shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    """Shrink every dimension by `scale` (at least 1), keeping the rank: SD-shaped, small."""
    return tuple(max(1, d // scale) for d in shape)


def make_state_dict(
    layout: str = "sd15",
    *,
    scale: int = 1,
    seed: int = 0,
    float_dtype: str | None = None,
    keys: int | None = None,
) -> dict[str, torch.Tensor]:
    """A state dict with the layout's keys; floats random (normal, std 0.5), integer
    buffers (position_ids) as arange like the real ones. `float_dtype` overrides the
    float dtype (e.g. "BF16")."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape, dt in load_layout(layout)[:keys]:
        shape = scaled_shape(shape, scale)
        info = DTYPES[dt]
        if info.kind == "float":
            target = DTYPES[float_dtype or dt].torch_dtype
            out[key] = (torch.randn(shape, generator=gen) * 0.5).to(target)
        else:
            numel = math.prod(shape)
            out[key] = torch.arange(numel, dtype=info.torch_dtype).reshape(shape)
    return out


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Written by the safetensors library itself, so inputs never come from our own writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
