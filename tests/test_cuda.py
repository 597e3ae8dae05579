"""The CUDA path gives the CPU's bytes: the streaming weighted sum and every library method
(statistic passes, exact selection, counter-based masks, exact sums). Skipped where torch
sees no CUDA device; run on a GPU machine with `bash benchmarks/cuda_check.sh`."""

from __future__ import annotations

import pytest
import torch
from conftest import one_pass_read_bytes, sha256, split_base
from safetensors.torch import load_file
from test_engine_methods import CASES

from astolfo_dist import merge

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]


def _differences(a, b) -> str:
    """Which keys differ between two outputs, and by how much: the message of a failed check."""
    x, y = load_file(str(a)), load_file(str(b))
    lines = [f"{key}: only in one output" for key in sorted(set(x) ^ set(y))]
    for key in sorted(set(x) & set(y)):
        if not torch.equal(x[key], y[key]):
            d = (x[key].double() - y[key].double()).abs()
            lines.append(f"{key}: {int((d > 0).sum())}/{d.numel()} elements differ, max {float(d.max()):.3g}")
    return f"{len(lines)} of {len(x)} keys differ:\n" + "\n".join(lines[:12])


@pytest.mark.parametrize("weights", [None, [0.5, 0.25, 0.125, 0.125, 1.0]])
@pytest.mark.parametrize("dtype", ["keep", "fp16", "bf16", "fp32"])
def test_cuda_output_equals_cpu_output(sd_models, tmp_path, weights, dtype):
    paths = [str(p) for p in sd_models(["F16", "BF16", "F32", "F16", "F16"], scale=8)]
    cpu = tmp_path / "cpu.safetensors"
    gpu = tmp_path / "gpu.safetensors"
    merge(paths, cpu, weights=weights, dtype=dtype, device="cpu", chunk_mb=0.5)
    merge(paths, gpu, weights=weights, dtype=dtype, device="cuda", chunk_mb=0.25, workers=2)
    assert sha256(cpu) == sha256(gpu), _differences(cpu, gpu)


@pytest.mark.parametrize("name,params,uses_base,n", CASES, ids=[c[0] for c in CASES])
def test_cuda_method_equals_cpu_method(sd_models, tmp_path, name, params, uses_base, n):
    paths = [str(p) for p in sd_models(["F16", "BF16", "F32", "F16"][:n] + ["F16"] * max(0, n - 4), scale=16)]
    models, base = split_base(paths, uses_base)
    cpu, gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    merge(models, cpu, method=name, base=base, params=params, device="cpu")
    once = one_pass_read_bytes(models, base, tmp_path / "once.safetensors")
    # Whole tensors, then many chunks per tensor, with the default tensor cache (inputs kept
    # on the GPU between passes: each byte read once), then many chunks read on every pass.
    for chunk_mb, workers, cache_mb in [(64, 2, None), (0.01, 2, None), (0.01, 1, 0)]:
        result = merge(models, gpu, method=name, base=base, params=params, device="cuda", chunk_mb=chunk_mb,
                       workers=workers, tensor_cache_mb=cache_mb, overwrite=True)
        assert sha256(cpu) == sha256(gpu), f"chunk_mb={chunk_mb}, tensor_cache_mb={cache_mb}: " + _differences(cpu, gpu)
        if cache_mb is None:
            assert result.read_bytes == once


@pytest.mark.parametrize("method,params", [("weighted_sum", {}), ("ties", {"density": 0.3})])
def test_cuda_over_ray_equals_cpu(sd_models, tmp_path, method, params):
    """Ray's tasks ask for CPUs only and reduce on the GPU their node shows them: a private
    local Ray with --device cuda gives the in-process CPU's bytes (its tasks see the GPU)."""
    pytest.importorskip("ray")
    paths = [str(p) for p in sd_models(["F16", "BF16", "F32", "F16"], scale=16)]
    models, base = split_base(paths, method == "ties")
    args = dict(method=method, base=base, params=params) if method == "ties" else dict(weights=[0.5, 0.3, 0.2, 1.0])
    cpu, gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    merge(models, cpu, device="cpu", **args)
    merge(models, gpu, device="cuda", executor="ray", workers=2, shard_mb=0.25, chunk_mb=0.05, **args)
    assert sha256(cpu) == sha256(gpu), _differences(cpu, gpu)
