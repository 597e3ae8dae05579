"""Model arguments: Hugging Face folders (single and sharded), fsspec URLs, pickled
checkpoints, and the errors for each, through resolve_model and end to end through merge."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import random
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import make_models
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from astolfo_dist import merge
from astolfo_dist.errors import InputError
from astolfo_dist.formats.header import read_header
from astolfo_dist.formats.readers import open_reader
from astolfo_dist.formats.sources import HF_INDEX, HF_SINGLE, resolve_model

KEYS = 80  # the first keys of the SD1.5 layout: small and quick, real names and ranks


@pytest.fixture
def models(tmp_path) -> list[Path]:
    """Two small SD-shaped models (F16, F32), written by the safetensors library."""
    return make_models(tmp_path / "in", ["F16", "F32"], keys=KEYS)


def payload_sha256(path: Path) -> str:
    """sha256 of a safetensors file without its __metadata__: every tensor entry, then the data
    section. The metadata records the model arguments (paths, URLs) and their header digests,
    so the same merge from differently named inputs differs there and only there."""
    reader = open_reader(str(path))
    try:
        header = read_header(reader)
    finally:
        reader.close()
    entries = {n: [i.dtype.name, list(i.shape), i.begin, i.end] for n, i in sorted(header.tensors.items())}
    h = hashlib.sha256(json.dumps(entries).encode())
    h.update(Path(path).read_bytes()[header.data_start :])
    return h.hexdigest()


def merged_models(path: Path) -> set[str]:
    """The model names the output's metadata records (keyed by header digest, so unordered)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return {m["name"] for m in json.loads(meta["sd_merge_models"]).values()}


def run_merge(inputs: list, out: Path, **kw) -> str:
    merge([str(m) for m in inputs], out, workers=2, **kw)
    return payload_sha256(out)


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], n: int = 2) -> list[Path]:
    """A transformers-style sharded folder: model-0000i-of-0000n.safetensors plus the index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards, weight_map = [], {}
    for i in range(n):
        part = names[i::n]
        shard = folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(shard), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in part})
        shards.append(shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return shards


# --- Hugging Face folders -----------------------------------------------------------------


def test_hf_folder_with_model_safetensors(tmp_path, models):
    folder = tmp_path / "hf-single"
    folder.mkdir()
    shutil.copyfile(models[0], folder / HF_SINGLE)
    (folder / "config.json").write_text("{}")
    src = resolve_model(str(folder))
    assert src.name == str(folder)
    assert src.files == (str(folder / HF_SINGLE),)

    expected = run_merge(models, tmp_path / "ref.safetensors")
    assert run_merge([folder, models[1]], tmp_path / "out.safetensors") == expected


def test_folder_with_one_safetensors_of_another_name(tmp_path, models):
    folder = tmp_path / "one-file"
    folder.mkdir()
    shutil.copyfile(models[0], folder / "v1-5-pruned.safetensors")
    assert resolve_model(str(folder)).files == (str(folder / "v1-5-pruned.safetensors"),)


def test_sharded_folder_merges_like_the_single_file(tmp_path, models):
    folder = tmp_path / "hf-sharded"
    shards = write_sharded(folder, load_file(str(models[0])))
    src = resolve_model(str(folder))
    assert src.files == tuple(str(s) for s in shards)
    assert [Path(f).name for f in src.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

    expected = run_merge(models, tmp_path / "ref.safetensors")
    out = tmp_path / "out.safetensors"
    assert run_merge([folder, models[1]], out) == expected
    assert merged_models(out) == {str(folder), str(models[1])}
    # Sharded on both sides, three shards against two: still the same tensors.
    folder_b = tmp_path / "hf-sharded-b"
    write_sharded(folder_b, load_file(str(models[1])), n=3)
    assert run_merge([folder, folder_b], tmp_path / "out2.safetensors") == expected


def test_key_in_two_shards_names_both_files(tmp_path, models):
    tensors = load_file(str(models[0]))
    folder = tmp_path / "dup-shards"
    shards = write_sharded(folder, tensors)
    # The index maps the key to one shard, but the other shard holds it too.
    with safe_open(str(shards[1]), framework="pt") as f:
        second = {k: f.get_tensor(k) for k in f.keys()}
    dup = sorted(second)[0]
    first = load_file(str(shards[0]))
    first[dup] = second[dup]
    save_file(first, str(shards[0]))
    with pytest.raises(InputError) as err:
        merge([str(folder), str(models[1])], tmp_path / "out.safetensors", workers=1)
    message = str(err.value)
    assert str(shards[0]) in message and str(shards[1]) in message, message
    assert repr(dup) in message
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("shard", ["sub/model.safetensors", "../model.safetensors", "..\\model.safetensors",
                                   "/abs/model.safetensors", "..", "."])
def test_index_with_a_path_is_rejected(tmp_path, models, shard):
    folder = tmp_path / "escape"
    write_sharded(folder, load_file(str(models[0])))
    index = folder / HF_INDEX
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        resolve_model(str(folder))
    assert str(index) in str(err.value)
    assert repr(shard) in str(err.value)


@pytest.mark.parametrize("text", ['{"weight_map": {"a": "model-00001-of-00002.safetensors",', "", "not json",
                                  "[]", '{"metadata": {}}', '{"weight_map": ["a"]}',
                                  '{"weight_map": {"a": 3}}'])
def test_invalid_index_is_rejected_naming_it(tmp_path, models, text):
    folder = tmp_path / "bad-index"
    write_sharded(folder, load_file(str(models[0])))
    (folder / HF_INDEX).write_text(text)
    with pytest.raises(InputError) as err:
        resolve_model(str(folder))
    assert str(err.value).startswith(str(folder / HF_INDEX) + ":"), str(err.value)


def test_index_naming_a_missing_shard(tmp_path, models):
    folder = tmp_path / "missing-shard"
    shards = write_sharded(folder, load_file(str(models[0])))
    shards[1].unlink()
    with pytest.raises(InputError) as err:
        merge([str(folder), str(models[1])], tmp_path / "out.safetensors", workers=1)
    assert str(shards[1]) in str(err.value)


# --- fsspec URLs --------------------------------------------------------------------------


@pytest.fixture
def memfs():
    """A private root in fsspec's (process-global) memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/astolfo-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)
    assert not fs.exists(root)


def test_file_urls_merge_like_paths(tmp_path, models):
    expected = run_merge(models, tmp_path / "ref.safetensors")
    urls = [f"file://{p}" for p in models]
    assert resolve_model(urls[0]).files == (str(models[0]),)
    out = tmp_path / "out.safetensors"
    assert run_merge(urls, out) == expected
    assert merged_models(out) == set(urls)


def test_memory_urls_merge_like_paths(tmp_path, models, memfs):
    fs, root = memfs
    urls = []
    for p in models:
        fs.pipe(f"{root}/{p.name}", p.read_bytes())
        urls.append(f"memory://{root}/{p.name}")
    assert resolve_model(urls[0]).files == (urls[0],)
    expected = run_merge(models, tmp_path / "ref.safetensors")
    out = tmp_path / "out.safetensors"
    assert run_merge(urls, out) == expected
    assert merged_models(out) == set(urls)
    # Mixed: one URL, one local path.
    assert run_merge([urls[0], models[1]], tmp_path / "mixed.safetensors") == expected


def test_memory_folders(tmp_path, models, memfs):
    fs, root = memfs
    fs.pipe(f"{root}/single/{HF_SINGLE}", models[0].read_bytes())
    fs.pipe(f"{root}/single/config.json", b"{}")
    folder = f"memory://{root}/single"
    assert resolve_model(folder).files == (f"{folder}/{HF_SINGLE}",)
    expected = run_merge(models, tmp_path / "ref.safetensors")
    assert run_merge([folder, models[1]], tmp_path / "out.safetensors") == expected

    local = tmp_path / "sharded"
    write_sharded(local, load_file(str(models[0])))
    for f in sorted(local.iterdir()):
        fs.pipe(f"{root}/sharded/{f.name}", f.read_bytes())
    sharded = f"memory://{root}/sharded"
    assert resolve_model(sharded).files == (
        f"{sharded}/model-00001-of-00002.safetensors",
        f"{sharded}/model-00002-of-00002.safetensors",
    )
    assert run_merge([sharded, models[1]], tmp_path / "out-sharded.safetensors") == expected


def test_memory_url_errors(tmp_path, models, memfs):
    fs, root = memfs
    missing = f"memory://{root}/nope.safetensors"
    with pytest.raises(InputError) as err:
        resolve_model(missing)
    assert missing in str(err.value)
    fs.pipe(f"{root}/empty/readme.txt", b"hi")
    with pytest.raises(InputError) as err:
        resolve_model(f"memory://{root}/empty")
    assert f"memory://{root}/empty" in str(err.value)
    fs.pipe(f"{root}/model.ckpt", b"x")
    with pytest.raises(InputError, match="local files only"):
        resolve_model(f"memory://{root}/model.ckpt")


# --- pickled checkpoints ------------------------------------------------------------------


def test_ckpt_converts_once_and_merges_like_safetensors(tmp_path, models):
    tensors = load_file(str(models[0]))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**tensors, "global_step": 1000, "name": "model"}, "epoch": 3}, ckpt)
    cache = tmp_path / "cache"

    src = resolve_model(str(ckpt), cache_dir=cache)
    assert src.name == str(ckpt)
    (converted,) = (Path(f) for f in src.files)
    assert converted.parent == cache / "converted" and converted.suffix == ".safetensors"
    loaded = load_file(str(converted))
    assert set(loaded) == set(tensors)  # nested state_dict unwrapped, non-tensors skipped
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k

    # Cached: the second resolve reuses the file without rewriting it.
    os.utime(converted, ns=(1_000_000_000, 1_000_000_000))
    before = converted.stat()
    again = resolve_model(str(ckpt), cache_dir=cache)
    assert again.files == src.files
    after = converted.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino) == (1_000_000_000, before.st_ino)
    assert list((cache / "converted").iterdir()) == [converted]

    expected = run_merge(models, tmp_path / "ref.safetensors")
    assert run_merge([ckpt, models[1]], tmp_path / "out.safetensors", cache_dir=cache) == expected
    assert after.st_mtime_ns == converted.stat().st_mtime_ns


def test_changed_ckpt_is_converted_again(tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(4)}, ckpt)
    first = Path(resolve_model(str(ckpt), cache_dir=tmp_path).files[0])
    torch.save({"w": torch.ones(4), "b": torch.ones(2)}, ckpt)
    os.utime(ckpt, ns=(5_000_000_000, 5_000_000_000))  # a new mtime whatever the clock's resolution
    second = Path(resolve_model(str(ckpt), cache_dir=tmp_path).files[0])
    assert second != first
    loaded = load_file(str(second))
    assert set(loaded) == {"w", "b"} and torch.equal(loaded["w"], torch.ones(4))


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpenPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_SystemPayload, _OpenPayload])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_does_not_run(tmp_path, payload, writer):
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"w": torch.zeros(2)}, "hook": payload(marker)}
    if writer == "torch.save":
        torch.save(obj, ckpt)
    else:
        with open(ckpt, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(InputError) as err:
        resolve_model(str(ckpt), cache_dir=tmp_path / "cache")
    assert str(ckpt) in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())
    with pytest.raises(InputError):
        merge([str(ckpt), str(ckpt)], tmp_path / "out.safetensors", cache_dir=tmp_path / "cache")
    assert not marker.exists()
    # Control: the payload is live, an unrestricted load does run it.
    if writer == "torch.save":
        torch.load(ckpt, weights_only=False)
    else:
        with open(ckpt, "rb") as f:
            pickle.load(f)
    assert marker.exists()


def _truncated_torch_save(path: Path) -> bytes:
    torch.save({"w": torch.zeros(64)}, path)
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("kind", ["random", "empty", "truncated", "text"])
def test_garbage_ckpt_is_input_error(tmp_path, kind):
    ckpt = tmp_path / "garbage.ckpt"
    blob = {
        "random": bytes(random.Random(3).randrange(256) for _ in range(4096)),
        "empty": b"",
        "truncated": _truncated_torch_save(tmp_path / "whole.pt"),
        "text": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
    }[kind]
    ckpt.write_bytes(blob)
    with pytest.raises(InputError) as err:
        resolve_model(str(ckpt), cache_dir=tmp_path / "cache")
    assert str(err.value).startswith(str(ckpt) + ":"), str(err.value)


@pytest.mark.parametrize("obj,what", [([torch.zeros(2), torch.ones(2)], "list"), (torch.zeros(3), "Tensor"),
                                      ({"state_dict": [torch.zeros(2)]}, "no tensors"), ({"epoch": 3}, "no tensors")])
def test_pickle_that_is_not_a_state_dict_is_rejected(tmp_path, obj, what):
    pt = tmp_path / "weights.pt"
    torch.save(obj, pt)
    with pytest.raises(InputError) as err:
        resolve_model(str(pt), cache_dir=tmp_path / "cache")
    assert str(pt) in str(err.value)
    assert what in str(err.value)


# --- missing inputs -----------------------------------------------------------------------


def test_missing_path(tmp_path, models):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(InputError) as err:
        resolve_model(str(missing))
    assert str(err.value).startswith(str(missing) + ":")
    with pytest.raises(InputError) as err:
        merge([str(models[0]), str(missing)], tmp_path / "out.safetensors")
    assert str(missing) in str(err.value)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("contents", [[], ["README.md", "config.json"], ["a.safetensors", "b.safetensors"]])
def test_folder_without_a_checkpoint(tmp_path, contents):
    folder = tmp_path / "no-model"
    folder.mkdir()
    for name in contents:
        (folder / name).write_bytes(b"x")
    with pytest.raises(InputError) as err:
        resolve_model(str(folder))
    assert str(err.value).startswith(str(folder) + ":"), str(err.value)
    assert HF_SINGLE in str(err.value)
