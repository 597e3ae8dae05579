"""The CUDA reduction gives the CPU's bytes. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch
from conftest import sha256

from astolfo_dist import merge

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]


@pytest.mark.parametrize("weights", [None, [0.5, 0.25, 0.125, 0.125, 1.0]])
@pytest.mark.parametrize("dtype", ["keep", "fp16", "bf16", "fp32"])
def test_cuda_output_equals_cpu_output(sd_models, tmp_path, weights, dtype):
    paths = [str(p) for p in sd_models(["F16", "BF16", "F32", "F16", "F16"], scale=8)]
    cpu = tmp_path / "cpu.safetensors"
    gpu = tmp_path / "gpu.safetensors"
    merge(paths, cpu, weights=weights, dtype=dtype, device="cpu", chunk_mb=0.5)
    merge(paths, gpu, weights=weights, dtype=dtype, device="cuda", chunk_mb=0.25, workers=2)
    assert sha256(cpu) == sha256(gpu)
