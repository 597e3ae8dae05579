"""Key policies, drops, integer tensors and dtype choices, decided by the plan."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from astolfo_dist import InputError, merge


def _save(path, tensors):
    save_file(tensors, str(path))
    return str(path)


@pytest.fixture
def uneven(tmp_path):
    g = torch.Generator().manual_seed(3)
    a = _save(tmp_path / "a.safetensors", {"x": torch.randn(5, generator=g), "only_a": torch.randn(3, generator=g),
                                           "ab": torch.randn(4, generator=g)})
    b = _save(tmp_path / "b.safetensors", {"x": torch.randn(5, generator=g), "ab": torch.randn(4, generator=g)})
    c = _save(tmp_path / "c.safetensors", {"x": torch.randn(5, generator=g), "only_c": torch.randn(2, generator=g)})
    return [a, b, c]


def test_intersection_keeps_common_keys(uneven, tmp_path):
    out = tmp_path / "o.safetensors"
    result = merge(uneven, out, keys="intersection")
    merged = load_file(str(out))
    assert set(merged) == {"x"}
    assert sorted(result.report.skipped) == ["ab", "only_a", "only_c"]
    ref = sum(load_file(p)["x"].double() for p in uneven) / 3
    assert torch.allclose(merged["x"].double(), ref, rtol=0, atol=1e-7)


def test_union_averages_over_the_inputs_that_hold_a_key(uneven, tmp_path):
    out = tmp_path / "o.safetensors"
    result = merge(uneven, out, keys="union", weights=[1, 2, 3], dtype="fp32")
    merged = load_file(str(out))
    sds = [load_file(p) for p in uneven]
    assert set(merged) == {"x", "ab", "only_a", "only_c"}
    assert torch.equal(merged["only_a"], sds[0]["only_a"])  # one holder: itself
    ab = (1 * sds[0]["ab"].double() + 2 * sds[1]["ab"].double()) / 3
    assert torch.equal(merged["ab"], ab.float())
    assert result.report.missing[uneven[1]] == ["only_a", "only_c"]


def test_drop_regex_removes_keys_everywhere(tmp_path):
    a = _save(tmp_path / "a.safetensors",
              {"w": torch.ones(2), "model_ema.w": torch.ones(2), "ema_decay": torch.ones(1)})
    b = _save(tmp_path / "b.safetensors", {"w": torch.zeros(2), "model_ema.w": torch.ones(2)})
    out = tmp_path / "o.safetensors"
    result = merge([a, b], out, drop=[r"^model_ema\.", r"^ema_"])
    assert set(load_file(str(out))) == {"w"}
    assert sorted(result.report.dropped) == ["ema_decay", "model_ema.w"]


def test_integer_tensors_are_copied_and_disagreement_warned(tmp_path):
    a = _save(tmp_path / "a.safetensors", {"w": torch.ones(2), "ids": torch.arange(6), "mask": torch.tensor([True])})
    b = _save(tmp_path / "b.safetensors", {"w": torch.zeros(2), "ids": torch.arange(6) * 2,
                                           "mask": torch.tensor([True])})
    out = tmp_path / "o.safetensors"
    result = merge([a, b], out, chunk_mb=0.000004)
    merged = load_file(str(out))
    assert torch.equal(merged["ids"], torch.arange(6)) and merged["ids"].dtype == torch.int64
    assert merged["mask"].dtype == torch.bool
    assert any("ids" in w and b in w for w in result.warnings)
    assert not any("mask" in w for w in result.warnings)


def test_float_vs_int_for_one_key_is_an_error(tmp_path):
    a = _save(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    b = _save(tmp_path / "b.safetensors", {"w": torch.ones(2, dtype=torch.int32)})
    with pytest.raises(InputError, match="'w'.*F32 vs I32"):
        merge([a, b], tmp_path / "o.safetensors")


def test_replace_prefix_absent_from_donor_is_an_error(tmp_path):
    a = _save(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    with pytest.raises(InputError, match="no tensor under --replace prefix"):
        merge([a], tmp_path / "o.safetensors", replace=[("text.", a)])


def test_eight_bit_float_inputs_are_reduced(tmp_path):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1000, generator=g).to(torch.float8_e4m3fn) for _ in range(3)]
    paths = [_save(tmp_path / f"{i}.safetensors", {"w": x}) for i, x in enumerate(xs)]
    out = tmp_path / "o.safetensors"
    merge(paths, out)
    got = load_file(str(out))["w"]
    assert got.dtype == torch.float8_e4m3fn
    ref = (sum(x.double() for x in xs) / 3).to(torch.float8_e4m3fn)
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
