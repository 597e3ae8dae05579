"""Model arguments -> safetensors files.

A model argument is a local file, a Hugging Face folder (one `model.safetensors`, or the
shards its `model.safetensors.index.json` lists), an fsspec URL of either, or a pickled
checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`). Pickles are loaded only with
`torch.load(weights_only=True)`, which refuses to run code, and converted once into a
cached safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .readers import is_url, missing_backend, url_to_fs

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelSource:
    """One input model: the name the user gave and the safetensors files that hold it."""

    name: str
    files: tuple[str, ...]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "astolfo-dist"


def resolve_model(arg: str, cache_dir: Path | None = None) -> ModelSource:
    location = arg[len("file://") :] if arg.startswith("file://") else arg
    if is_url(location):
        return _resolve_url(arg)
    path = Path(location)
    if not path.exists():
        raise InputError(arg, "no such file or directory")
    if path.is_dir():
        return ModelSource(arg, _folder_files(arg, str(path), _LocalFolder()))
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return ModelSource(arg, (str(convert_pickle(path, cache_dir or default_cache_dir())),))
    return ModelSource(arg, (str(path),))


class _LocalFolder:
    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_text(self, path: str) -> str:
        return Path(path).read_text(encoding="utf-8")

    def join(self, folder: str, name: str) -> str:
        return os.path.join(folder, name)

    def listdir(self, folder: str) -> list[str]:
        return sorted(os.listdir(folder))


class _FsspecFolder:
    def __init__(self, url: str) -> None:
        self.fs, self.root = url_to_fs(url)  # the readers' storage options (readers.remote_options)
        self.protocol = url.split("://", 1)[0]

    def exists(self, path: str) -> bool:
        return self.fs.exists(self._path(path))

    def read_text(self, path: str) -> str:
        return self.fs.cat_file(self._path(path)).decode("utf-8")

    def join(self, folder: str, name: str) -> str:
        return posixpath.join(folder.rstrip("/"), name)

    def listdir(self, folder: str) -> list[str]:
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self._path(folder), detail=False))

    def _path(self, url: str) -> str:
        return url_to_fs(url)[1]


def _resolve_url(url: str) -> ModelSource:
    try:
        folder = _FsspecFolder(url)
        info = folder.fs.info(folder.root)
    except FileNotFoundError:
        raise InputError(url, "no such file or directory") from None
    except PermissionError as exc:
        raise InputError(url, f"permission denied ({exc})") from None
    except ImportError as exc:
        raise missing_backend(url, exc) from None
    except ValueError as exc:
        raise InputError(url, f"cannot open URL: {exc}") from None
    if info.get("type") == "directory":
        return ModelSource(url, _folder_files(url, url, folder))
    if url.lower().endswith(PICKLE_SUFFIXES):
        raise InputError(url, "pickled checkpoints are converted from local files only; download it first")
    return ModelSource(url, (url,))


def _folder_files(arg: str, folder: str, fs: _LocalFolder | _FsspecFolder) -> tuple[str, ...]:
    index = fs.join(folder, HF_INDEX)
    if fs.exists(index):
        try:
            weight_map = json.loads(fs.read_text(index))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise InputError(index, "not a valid index: expected {'weight_map': {tensor: file}}") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise InputError(index, f"shard name {shard!r} is not a plain file name")
        return tuple(fs.join(folder, s) for s in shards)
    single = fs.join(folder, HF_SINGLE)
    if fs.exists(single):
        return (single,)
    found = [n for n in fs.listdir(folder) if n.endswith(".safetensors")]
    if len(found) == 1:
        return (fs.join(folder, found[0]),)
    what = f"{len(found)} .safetensors files and no index" if found else "no checkpoint"
    raise InputError(arg, f"folder holds {what} (expected {HF_SINGLE} or {HF_INDEX})")


# --- pickled checkpoints ------------------------------------------------------------------


def convert_pickle(path: Path, cache_dir: Path) -> Path:
    """Convert a pickled checkpoint once into `cache_dir`, keyed by path, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    target = cache_dir / "converted" / f"{path.stem}-{key}.safetensors"
    if target.exists():
        return target
    state = _load_state_dict(path)
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            # Tied or viewed tensors share storage; safetensors wants one buffer each.
            tensors[name] = value.detach().contiguous().clone()
        else:
            log.warning("%s: skipping non-tensor entry %r (%s)", path, name, type(value).__name__)
    if not tensors:
        raise InputError(str(path), "checkpoint holds no tensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".partial")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"astolfo_converted_from": path.name})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("converted %s -> %s", path, target)
    return target


def _load_state_dict(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(str(path), f"cannot be loaded safely as a weights-only checkpoint: {first}") from None
    except Exception as exc:  # torch.load raises many types for hostile or garbage input
        raise InputError(str(path), f"cannot be loaded as a checkpoint: {type(exc).__name__}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(str(path), f"checkpoint is a {type(obj).__name__}, expected a dict of tensors")
    return obj
