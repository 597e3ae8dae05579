"""The offset writer: one preallocated `OUT.partial`, positioned writes, atomic commit.

Hand-written because no library writes a safetensors file piecewise from many threads:
the layout is fixed by the plan, so every chunk has a known offset and workers write
without coordinating.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from ..errors import OutputExistsError, UsageError

log = logging.getLogger(__name__)

_HAS_FADVISE = hasattr(os, "posix_fadvise")
WRITEBACK_MIN = 64 << 10


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def check_output(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, if the output cannot be written."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output exists (pass --overwrite to replace it)")
    if path.is_dir():
        raise UsageError(f"{path}: output is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: output folder does not exist")


class OutputFile:
    """Writes into `OUT.partial`; `commit()` makes it `OUT`, `abort()` removes it."""

    def __init__(self, path: Path, total_size: int, header: bytes, overwrite: bool) -> None:
        check_output(path, overwrite)
        self.path = path
        self.partial = partial_path(path)
        self.overwrite = overwrite
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _preallocate(self._fd, total_size)
            self.write(0, memoryview(header))
        except BaseException:
            self.abort()
            raise

    def write(self, offset: int, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" else data
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        if _HAS_FADVISE and len(view) >= WRITEBACK_MIN:
            # Start writing these pages to disk now (DONTNEED begins writeback of dirty
            # pages and drops clean ones): the final fsync then has little left to do,
            # and the page cache does not fill with output the merge never reads again.
            os.posix_fadvise(self._fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def commit(self) -> Path:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        if self.overwrite:
            os.replace(self.partial, self.path)
        else:
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
        _fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.partial)
        except FileNotFoundError:
            pass


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
