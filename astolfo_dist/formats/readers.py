"""Positioned byte-range readers over local files and fsspec URLs.

Workers read each chunk of each input into a buffer they reuse (positioned reads, not a
memory map), so a worker's memory is its buffers whatever the size of the inputs; page
cache pages are the kernel's and are reclaimable.
"""

from __future__ import annotations

import os
from typing import Protocol

import fsspec

from ..errors import InputError

_HAS_FADVISE = hasattr(os, "posix_fadvise")


class RangeReader(Protocol):
    """Reads byte ranges of one file. Must be safe to call from several threads at once."""

    name: str
    size: int

    def read_into(self, offset: int, buf: memoryview) -> None: ...

    def prefetch(self, offset: int, length: int) -> None:
        """Hint that this range is read next (may do nothing)."""

    def close(self) -> None: ...


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


class LocalFileReader:
    """pread(2) on one shared descriptor: thread-safe, releases the GIL, no seek state."""

    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except IsADirectoryError:
            raise InputError(path, "is a directory, expected a file") from None
        except OSError as exc:
            raise InputError(path, f"cannot open: {exc.strerror}") from None
        self.size = os.fstat(self._fd).st_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise InputError(self.name, f"file ended at byte {offset + done} (was it truncated?)")
            done += n

    def prefetch(self, offset: int, length: int) -> None:
        if _HAS_FADVISE:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FsspecReader:
    """Range reads through fsspec (`cat_file` with start/end: one request per range)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.name = url
        try:
            self._fs, self._path = fsspec.core.url_to_fs(url, **(storage_options or {}))
            info = self._fs.info(self._path)
        except FileNotFoundError:
            raise InputError(url, "no such file") from None
        except (ValueError, ImportError) as exc:
            raise InputError(url, f"cannot open URL: {exc}") from None
        if info.get("type") == "directory":
            raise InputError(url, "is a directory, expected a file")
        self.size = int(info["size"])

    def read_into(self, offset: int, buf: memoryview) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        data = self._fs.cat_file(self._path, start=offset, end=offset + len(view))
        if len(data) != len(view):
            raise InputError(self.name, f"short read at byte {offset} (was it truncated?)")
        view[:] = data

    def prefetch(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_reader(location: str) -> RangeReader:
    if location.startswith("file://"):
        location = location[len("file://") :]
    if is_url(location):
        return FsspecReader(location)
    return LocalFileReader(location)


def read_bytes(reader: RangeReader, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    reader.read_into(offset, memoryview(buf))
    return bytes(buf)
