"""Hugging Face sharded output, and resuming a merge whose driver was killed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_models, sha256
from safetensors.torch import load_file

from astolfo_dist import merge
from astolfo_dist.journal import journal_path
from astolfo_dist.merge import plan_for
from astolfo_dist.recipe import MergeRecipe
from astolfo_dist.shards import make_shards

CLI = [sys.executable, "-m", "astolfo_dist"]


def test_sharded_output_holds_the_same_tensors_and_a_valid_index(sd_models, tmp_path):
    paths = [str(p) for p in sd_models(["F16", "BF16", "F16"], scale=16)]
    single = tmp_path / "single.safetensors"
    folder = tmp_path / "sharded"
    merge(paths, single)
    merge(paths, folder, shard_size=300_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 3 and files == sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    whole = load_file(str(single))
    assert set(index["weight_map"]) == set(whole)
    seen = {}
    for name in files:
        part = load_file(str(folder / name))
        assert all(index["weight_map"][k] == name for k in part)
        data = sum(t.numel() * t.element_size() for t in part.values())
        assert data <= 300_000 or len(part) == 1  # only a tensor larger than the limit stands alone
        seen.update(part)
    assert set(seen) == set(whole)
    assert all(torch.equal(seen[k].view(torch.uint8), whole[k].view(torch.uint8)) for k in whole)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    # the sharded folder is itself a valid input, and merging it alone reproduces it
    again = tmp_path / "again.safetensors"
    merge([str(folder)], again)
    assert all(torch.equal(load_file(str(again))[k].view(torch.uint8), whole[k].view(torch.uint8)) for k in whole)


def test_sharded_output_refuses_an_existing_folder_without_overwrite(sd_models, tmp_path):
    paths = [str(p) for p in sd_models(["F16", "F16"], keys=20)]
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="--overwrite"):
        merge(paths, folder, shard_size=10_000)
    assert (folder / "keep.txt").read_text() == "mine"
    merge(paths, folder, shard_size=10_000, overwrite=True)
    assert not (folder / "keep.txt").exists() and (folder / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("*.partial*")) and not list(tmp_path.glob("*.old"))


def _journaled(out: Path) -> list[int]:
    path = journal_path(out)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines()[1:] if line.endswith("}")]
    return [json.loads(line)["shard"] for line in lines]


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory):
    return [str(p) for p in make_models(tmp_path_factory.mktemp("resume"), ["F32"] * 3, scale=4)]


def test_resume_after_killed_driver_recomputes_only_unfinished_shards(slow_inputs, tmp_path):
    options = ["--workers", "1", "--chunk-mb", "0.05", "--shard-mb", "4", "--dtype", "fp16"]
    reference = tmp_path / "reference.safetensors"
    merge(slow_inputs, reference, workers=2, dtype="fp16")

    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen([*CLI, "merge", *slow_inputs, "-o", str(out), *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_journaled(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the merge ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    journaled = set(_journaled(out))
    assert len(journaled) >= 3
    assert out.with_name(out.name + ".partial").exists() and not out.exists()

    result = merge(slow_inputs, out, workers=2, chunk_mb=1, shard_mb=4, dtype="fp16", resume=True)
    recipe = MergeRecipe(models=tuple(slow_inputs), dtype="fp16")
    all_shards = {s.index for s in make_shards(plan_for(recipe), 4 << 20)}
    assert set(result.reused_shards) == journaled
    assert set(result.computed_shards) == all_shards - journaled
    assert sha256(out) == sha256(reference)
    assert not journal_path(out).exists() and not out.with_name(out.name + ".partial").exists()


def test_resume_recomputes_a_journaled_shard_whose_bytes_were_damaged(slow_inputs, tmp_path):
    small = slow_inputs[:2]
    out = tmp_path / "out.safetensors"
    reference = tmp_path / "reference.safetensors"
    merge(small, reference, shard_mb=8)
    # A finished run leaves no journal; fake an interrupted one by journaling every shard
    # and then damaging the bytes of one of them in the partial file.
    partial = out.with_name(out.name + ".partial")
    import shutil

    shutil.copyfile(reference, partial)
    recipe = MergeRecipe(models=tuple(small))
    plan = plan_for(recipe)
    shards = make_shards(plan, 8 << 20)
    from astolfo_dist.journal import Journal, JournalEntry, shard_output_ranges, verify

    entries = {}
    for s in shards:
        crc, n = 0, 0
        data = reference.read_bytes()
        import zlib

        for _f, b, e in shard_output_ranges(plan, s):
            crc = zlib.crc32(data[b:e], crc)
            n += e - b
        entries[s.index] = JournalEntry(s.index, crc, n)
    Journal(journal_path(out), plan.digest(), 8 << 20, entries).close()
    assert verify(plan, shards, entries, [str(partial)]) == set(entries)
    victim = shards[len(shards) // 2]
    _f, begin, _end = shard_output_ranges(plan, victim)[0]
    with open(partial, "r+b") as f:
        f.seek(begin)
        f.write(b"\xff\xff\xff\xff")
    result = merge(small, out, shard_mb=8, resume=True)
    assert result.computed_shards == [victim.index]
    assert sha256(out) == sha256(reference)


def test_resume_after_killed_ray_driver(slow_inputs, tmp_path):
    """The journal is the executor's: a killed driver of a private local Ray resumes too. Ray's
    per-node agents outlive a SIGKILLed driver; the next private start reaps them."""
    import psutil

    reference = tmp_path / "reference.safetensors"
    merge(slow_inputs, reference, dtype="fp16")
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen(
        [*CLI, "merge", *slow_inputs, "-o", str(out), "--executor", "ray", "--workers", "1", "--chunk-mb", "0.05",
         "--shard-mb", "4", "--dtype", "fp16"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while len(_journaled(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the merge ended before it could be killed"
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    assert ray_processes
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    journaled = set(_journaled(out))
    def running(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE  # a zombie has exited; only its parent's reaping is left
        except psutil.NoSuchProcess:
            return False

    from astolfo_dist.executors.ray import reap_stale_private_rays

    time.sleep(1)  # give fate-sharing processes (raylet, gcs) their moment
    reap_stale_private_rays()
    alive = [p for p in ray_processes if running(p)]
    for p in alive:  # never leave any behind, whatever the assertion says
        p.kill()
    assert not alive, f"Ray processes outlived their driver and the reaper: {[p.pid for p in alive]}"

    result = merge(slow_inputs, out, chunk_mb=1, shard_mb=4, dtype="fp16", resume=True)
    assert set(result.reused_shards) == journaled and journaled
    assert not set(result.computed_shards) & journaled
    assert sha256(out) == sha256(reference)
