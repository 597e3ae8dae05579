"""Shared helpers: small SD-shaped checkpoints written by the safetensors library itself,
and a float64 reference computed independently of the engine."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from astolfo_dist import merge
from astolfo_dist.synthetic import make_state_dict, write_checkpoint

# A slice of the SD1.5 layout (text encoder, UNet and VAE keys, position_ids included),
# every dimension divided by 32: real key names and ranks, a few hundred KB per model.
SMALL_KEYS = None  # all keys
SMALL_SCALE = 32


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_models(folder: Path, dtypes: list[str], *, scale: int = SMALL_SCALE, keys: int | None = SMALL_KEYS,
                seed0: int = 0) -> list[Path]:
    """One SD1.5-shaped checkpoint per entry of `dtypes` (float dtype override, e.g. "BF16")."""
    paths = []
    for i, dt in enumerate(dtypes):
        sd = make_state_dict("sd15", scale=scale, seed=seed0 + i, float_dtype=dt, keys=keys)
        paths.append(write_checkpoint(folder / f"m{i}-{dt.lower()}.safetensors", sd))
    return paths


def split_base(paths: list, uses_base: bool) -> tuple[list, object | None]:
    """(models, base): the last path is the base of a task-vector method."""
    return (paths[:-1], paths[-1]) if uses_base else (paths, None)


def one_pass_read_bytes(models: list, base: object | None, out: Path) -> int:
    """What a method without statistic passes reads from these inputs: each byte once."""
    method = "task_arithmetic" if base is not None else "weighted_sum"
    return merge([str(m) for m in models], out, method=method, base=None if base is None else str(base)).read_bytes


def reference(paths: list[Path], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """float64 weighted average of the float tensors, done in memory with plain torch."""
    sds = [load_file(str(p)) for p in paths]
    w = torch.tensor(weights if weights is not None else [1.0] * len(paths), dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key, first in sds[0].items():
        if first.is_floating_point():
            out[key] = sum(wi * sd[key].to(torch.float64) for wi, sd in zip(w.tolist(), sds, strict=False))
        else:
            out[key] = first
    return out


@pytest.fixture
def sd_models(tmp_path: Path):
    def make(dtypes: list[str], **kw) -> list[Path]:
        return make_models(tmp_path / "in", dtypes, **kw)

    return make
