"""The offset writer: preallocated partial output, positioned writes, atomic commit.

Hand-written because no library writes a safetensors file piecewise from many threads or
machines: the layout is fixed by the plan, so every chunk has a known offset and workers
write without coordinating. A single-file output is written as `OUT.partial` and renamed;
sharded output is a folder `OUT.partial/` holding the shards and the index, renamed whole.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import OutputExistsError, UsageError

log = logging.getLogger(__name__)

_HAS_FADVISE = hasattr(os, "posix_fadvise")
WRITEBACK_MIN = 64 << 10
INDEX_NAME = "model.safetensors.index.json"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def check_output(path: Path, overwrite: bool, sharded: bool = False) -> None:
    """Fail early, before any work, if the output cannot be written."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output exists (pass --overwrite to replace it)")
    if path.is_dir() and not sharded:
        raise UsageError(f"{path}: output is a directory (use --shard-size for a sharded output folder)")
    if path.exists() and not path.is_dir() and sharded:
        raise UsageError(f"{path}: sharded output needs a folder, and a file is in the way")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: output folder does not exist")


class PartialWriter:
    """Positioned writes into existing partial files: the sink a worker uses where the
    output's storage is reachable (in-process threads, or Ray tasks on a shared filesystem)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._fds: list[int] = []
        try:
            for p in paths:
                self._fds.append(os.open(p, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)))
        except BaseException:
            self.close()
            raise

    def write(self, file: int, offset: int, data: memoryview) -> None:
        fd = self._fds[file]
        view = data.cast("B") if data.format != "B" else data
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        if _HAS_FADVISE and len(view) >= WRITEBACK_MIN:
            # Start writing these pages to disk now (DONTNEED begins writeback of dirty
            # pages and drops clean ones): the final fsync then has little left to do,
            # and the page cache does not fill with output the merge never reads again.
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class OutputSet:
    """The driver's side: creates the partial file(s) with their headers, commits or aborts.

    `resume=True` keeps an existing partial output (its journal says which shards it holds).
    """

    def __init__(
        self,
        path: Path,
        layouts: Sequence[tuple[str, bytes, int]],  # (name, header, size); name "" = single file
        overwrite: bool,
        resume: bool = False,
    ) -> None:
        self.sharded = not (len(layouts) == 1 and layouts[0][0] == "")
        check_output(path, overwrite, self.sharded)
        self.path = path
        self.partial = partial_path(path)
        self.overwrite = overwrite
        if self.sharded:
            self.files = [self.partial / name for name, _h, _s in layouts]
        else:
            self.files = [self.partial]
        sizes = [size for _name, _header, size in layouts]
        reuse = resume and all(f.is_file() and f.stat().st_size == n for f, n in zip(self.files, sizes, strict=True))
        self.resumed = reuse
        try:
            if not reuse:
                self._remove_partial()
                if self.sharded:
                    self.partial.mkdir()
                for f, (_name, header, size) in zip(self.files, layouts, strict=True):
                    _create(f, header, size)
        except BaseException:
            self.abort()
            raise

    @property
    def paths(self) -> list[str]:
        return [str(f) for f in self.files]

    def write_index(self, text: str) -> None:
        (self.partial / INDEX_NAME).write_text(text)

    def commit(self) -> Path:
        for f in self.files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.sharded:
            _fsync_dir(self.partial)
            self._commit_folder()
        else:
            self._commit_file()
        _fsync_dir(self.path.parent)
        return self.path

    def _commit_file(self) -> None:
        if self.overwrite:
            os.replace(self.partial, self.path)
            return
        # link(2) fails if the target appeared meanwhile: never clobber without --overwrite.
        try:
            os.link(self.partial, self.path)
        except FileExistsError:
            self.abort()
            raise OutputExistsError(f"{self.path}: output appeared during the merge; kept it untouched") from None
        except OSError:  # filesystems without hard links
            if self.path.exists():
                self.abort()
                raise OutputExistsError(f"{self.path}: output appeared during the merge") from None
            os.replace(self.partial, self.path)
        else:
            os.unlink(self.partial)

    def _commit_folder(self) -> None:
        old = None
        if self.path.exists():
            if not self.overwrite:
                self.abort()
                raise OutputExistsError(f"{self.path}: output appeared during the merge; kept it untouched")
            old = self.path.with_name(self.path.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.rename(self.path, old)
        os.rename(self.partial, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        self._remove_partial()

    def _remove_partial(self) -> None:
        if self.partial.is_dir():
            shutil.rmtree(self.partial, ignore_errors=True)
        else:
            try:
                os.unlink(self.partial)
            except FileNotFoundError:
                pass


def _create(path: Path, header: bytes, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        _preallocate(fd, size)
        view = memoryview(header)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
    finally:
        os.close(fd)


def _preallocate(fd: int, size: int) -> None:
    """Reserve the blocks up front: a full disk fails before any work, and writes into
    allocated extents are several times faster than into a sparse file (ext4 measured)."""
    os.ftruncate(fd, size)
    if hasattr(os, "posix_fallocate") and size > 0:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
            # filesystems without fallocate (some network ones): the sparse file will do


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
