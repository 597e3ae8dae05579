"""The same recipe gives the same bytes whatever the worker count, chunk size or sharding."""

from __future__ import annotations

import pytest
from conftest import sha256

from astolfo_dist import merge
from astolfo_dist.merge import plan_for
from astolfo_dist.recipe import MergeRecipe
from astolfo_dist.shards import make_shards


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from conftest import make_models

    return make_models(tmp_path_factory.mktemp("det"), ["F16", "BF16", "F32", "F16"], scale=16)


@pytest.mark.parametrize("weights", [None, [0.4, 0.1, 0.3, 0.2]])
def test_sha256_is_independent_of_workers_chunks_and_shards(inputs, tmp_path, weights):
    digests = {}
    for workers, chunk_mb, shard_mb in [(1, 64, None), (2, 64, 0.5), (4, 1, 0.25), (2, 1, None), (4, 0.004, 1.0)]:
        out = tmp_path / f"w{workers}-c{chunk_mb}-s{shard_mb}.safetensors"
        merge([str(p) for p in inputs], out, weights=weights, workers=workers, chunk_mb=chunk_mb, shard_mb=shard_mb)
        digests[(workers, chunk_mb, shard_mb)] = sha256(out)
    assert len(set(digests.values())) == 1, digests


def test_shards_cover_every_unit_once_and_split_large_tensors(inputs):
    recipe = MergeRecipe(models=tuple(str(p) for p in inputs))
    plan = plan_for(recipe)
    target = 64 << 10
    shards = make_shards(plan, target)
    covered: dict[int, list[tuple[int, int]]] = {}
    for shard in shards:
        for piece in shard.pieces:
            covered.setdefault(piece.tensor, []).append((piece.start, piece.stop))
    assert sorted(covered) == list(range(len(plan.tensors)))
    for index, ranges in covered.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == plan.tensors[index].units
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    split = [i for i, r in covered.items() if len(r) > 1]
    assert split, "a tensor larger than the shard target must be split"
    # balanced: no shard holds more than the target plus one unit's worth of reads
    assert max(s.read_bytes for s in shards) <= target + 16
    assert sum(s.read_bytes for s in shards) == pytest.approx(plan.read_bytes, rel=1e-6)
    assert make_shards(plan, target) == shards  # a function of the plan alone
