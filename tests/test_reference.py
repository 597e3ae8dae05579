"""The merge against an independent float64 in-memory reference, on small SD-shaped models."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import reference
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from astolfo_dist import merge

MIXED = ["F16", "BF16", "F32"]
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
TEXT_ENCODER = "cond_stage_model."
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of a's dtype lie between a and b (0 = equal)."""
    assert a.dtype == b.dtype
    bits = 8 * a.element_size()
    ia, ib = (x.contiguous().view(_INT_VIEW[x.dtype]).to(torch.int64) for x in (a, b))
    # Map sign-magnitude bit patterns onto a monotonic integer line.
    sign = 1 << (bits - 1)
    oa = torch.where(ia < 0, -(ia & (sign - 1)), ia)
    ob = torch.where(ib < 0, -(ib & (sign - 1)), ib)
    return (oa - ob).abs()


def check_against_reference(out_path, ref: dict[str, torch.Tensor], max_ulp: int) -> dict[str, int]:
    out = load_file(str(out_path))
    assert set(out) == set(ref)
    worst = 0
    exact = total = 0
    for key, expected in ref.items():
        got = out[key]
        if not expected.is_floating_point() or expected.dtype != torch.float64:
            assert torch.equal(got, expected), key
            continue
        want = expected.to(got.dtype)
        dist = ulp_distance(got, want)
        worst = max(worst, int(dist.max()) if dist.numel() else 0)
        exact += int((dist == 0).sum())
        total += dist.numel()
        assert worst <= max_ulp, f"{key}: {int(dist.max())} ulp from the float64 reference"
    return {"worst": worst, "exact": exact, "total": total}


@pytest.mark.parametrize("n", range(1, 9))
def test_uniform_mixed_dtypes_matches_float64_reference(sd_models, tmp_path, n):
    dtypes = list(itertools.islice(itertools.cycle(MIXED), n))
    paths = sd_models(dtypes)
    ref = reference(paths)
    out = tmp_path / "out.safetensors"
    merge([str(p) for p in paths], out, chunk_mb=0.01, workers=2)
    stats = check_against_reference(out, ref, max_ulp=1)
    # Rounded once from a wide accumulator: nearly every element is the exact rounding.
    assert stats["exact"] >= 0.999 * stats["total"]
    # keep: the first input's float dtype
    with safe_open(str(out), "pt") as f:
        assert f.get_slice(POSITION_IDS).get_dtype() == "I64"
        first_dtype = {"F16": "F16", "BF16": "BF16", "F32": "F32"}[dtypes[0]]
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_dtype() == first_dtype


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                               ("fp32", torch.float32)])
@pytest.mark.parametrize("accumulate", ["auto", "fp32", "fp64"])
def test_output_dtypes_and_accumulators(sd_models, tmp_path, dtype, torch_dtype, accumulate):
    paths = sd_models(["BF16", "F32", "F16", "F32", "BF16"])
    out = tmp_path / "out.safetensors"
    merge([str(p) for p in paths], out, dtype=dtype, accumulate=accumulate)
    ref = reference(paths)
    loaded = load_file(str(out))
    for key, expected in ref.items():
        if expected.dtype == torch.float64:
            assert loaded[key].dtype == torch_dtype
    if accumulate == "fp32" and dtype in ("fp32", "bf16"):
        # Where terms cancel, a float32 sum is not within one float32 (or bfloat16) ulp of
        # the exact sum: the bound is the accumulation error, n * eps * sum|w x|, plus the
        # final rounding. (That is why "auto" accumulates these outputs in float64.)
        srcs = [load_file(str(p)) for p in paths]
        for key, expected in ref.items():
            if expected.dtype != torch.float64:
                continue
            mass = sum(s[key].double().abs() for s in srcs) / len(srcs)
            rounding = 2.0**-8 if dtype == "bf16" else 2.0**-23
            bound = len(paths) * 2.0**-24 * mass + expected.abs() * rounding
            assert ((loaded[key].double() - expected).abs() <= bound).all(), key
    else:
        check_against_reference(out, ref, max_ulp=1)


def test_weighted_sum_is_normalised(sd_models, tmp_path):
    paths = sd_models(["F16", "F16", "BF16"])
    out = tmp_path / "out.safetensors"
    merge([str(p) for p in paths], out, weights=[5, 3, 2])
    check_against_reference(out, reference(paths, [0.5, 0.3, 0.2]), max_ulp=1)
    # the same weights, scaled, give the same bytes
    out2 = tmp_path / "out2.safetensors"
    merge([str(p) for p in paths], out2, weights=[0.5, 0.3, 0.2])
    assert load_file(str(out)).keys() == load_file(str(out2)).keys()
    a, b = load_file(str(out)), load_file(str(out2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp64_accumulation_is_the_exact_rounding(sd_models, tmp_path):
    paths = sd_models(["F16", "BF16", "F32", "F16", "F16", "BF16", "F32"])
    out = tmp_path / "out.safetensors"
    merge([str(p) for p in paths], out, accumulate="fp64", dtype="fp16")
    stats = check_against_reference(out, reference(paths), max_ulp=1)
    # float64 sums differ from the reference's float64 sums only in the last float64 bits,
    # which flips a float16 rounding only for values within 2^-40 of a tie.
    assert stats["total"] - stats["exact"] <= 2


def test_replace_copies_the_donor_bit_for_bit_and_int_tensors_survive(sd_models, tmp_path):
    paths = sd_models(["F16", "F16", "F16", "F32"])
    donor = paths[-1]
    inputs = paths[:-1]
    out = tmp_path / "out.safetensors"
    result = merge([str(p) for p in inputs], out, replace=[f"{TEXT_ENCODER}={donor}"])
    merged, donor_sd = load_file(str(out)), load_file(str(donor))
    te_keys = [k for k in donor_sd if k.startswith(TEXT_ENCODER)]
    assert te_keys and result.report.replaced == {TEXT_ENCODER: len(te_keys)}
    for key in te_keys:
        assert merged[key].dtype == donor_sd[key].dtype  # float32 from the donor, unchanged
        assert torch.equal(merged[key].view(torch.uint8), donor_sd[key].view(torch.uint8)), key
    assert merged[POSITION_IDS].dtype == torch.int64
    assert torch.equal(merged[POSITION_IDS], torch.arange(merged[POSITION_IDS].numel()).reshape(1, -1))
    ref = reference(inputs)
    check_against_reference(out, {k: (donor_sd[k] if k.startswith(TEXT_ENCODER) else v) for k, v in ref.items()}, 1)


def test_layout_is_the_one_safetensors_writes(sd_models, tmp_path):
    paths = sd_models(["F16", "BF16"])
    out = tmp_path / "out.safetensors"
    merge([str(p) for p in paths], out)
    tensors = load_file(str(out))
    again = tmp_path / "again.safetensors"
    save_file(tensors, str(again))  # no metadata: compare the layout, then the data bytes
    ours, theirs = out.read_bytes(), again.read_bytes()
    n_ours = int.from_bytes(ours[:8], "little")
    n_theirs = int.from_bytes(theirs[:8], "little")
    assert n_ours % 8 == 0
    assert ours[8 + n_ours:] == theirs[8 + n_theirs:]
    import json
    h_ours = json.loads(ours[8:8 + n_ours])
    h_theirs = json.loads(theirs[8:8 + n_theirs])
    meta = h_ours.pop("__metadata__")
    assert list(h_ours.items()) == list(h_theirs.items())
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["method"] == "uniform" and recipe["models"] == [str(p) for p in paths]
    assert len(json.loads(meta["sd_merge_models"])) == 2
    assert "astolfo_dist_version" in meta
