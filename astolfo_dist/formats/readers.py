"""Positioned byte-range readers over local files and fsspec URLs.

Workers read each chunk of each input into a buffer they reuse (positioned reads, not a
memory map), so a worker's memory is its buffers whatever the size of the inputs; page
cache pages are the kernel's and are reclaimable. Remote files are read by byte ranges,
optionally through a block cache on local disk (`open_reader(url, cache_dir=...)`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Protocol

import fsspec
from fsspec.caching import MMapCache

from ..errors import InputError

try:
    import fcntl
except ImportError:  # not POSIX: no lock between processes sharing a cache folder
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

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


# --- remote inputs ---------------------------------------------------------------------------

# Block of the on-disk range cache (--cache-dir): what one cache miss fetches. Larger than a
# worker's read (1-8 MiB) so a miss costs few requests, small enough that the transient
# buffer of a fetch stays a few MiB per worker.
RANGE_CACHE_BLOCK = 4 << 20
_S3_PROTOCOLS = ("s3", "s3a")
_UNCACHED_PROTOCOLS = ("memory", "file", "local")  # the data is local already


def url_protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def remote_options(url: str) -> dict:
    """fsspec storage options for `url`: the one place remote inputs are configured, used by
    the readers and by folder resolution alike.

    Credentials, region and the rest come from each backend's own standard configuration
    (for s3://, botocore's: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
    AWS_PROFILE, ~/.aws). The one option set here is the S3 endpoint: when AWS_ENDPOINT_URL_S3
    or AWS_ENDPOINT_URL is set (and AWS_IGNORE_CONFIGURED_ENDPOINT_URLS is not), it is passed
    to s3fs as `endpoint_url`. Recent botocore (>= 1.31) reads these variables itself; passing
    the value makes older ones honour them too, and makes it part of fsspec's filesystem
    instance key, so a changed endpoint never reuses a client made for the previous one. An
    endpoint in fsspec's own configuration (FSSPEC_S3_ENDPOINT_URL, fsspec config files) wins.
    """
    if url_protocol(url) not in _S3_PROTOCOLS:
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    ignored = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() in ("1", "true")
    configured = fsspec.config.conf.get(url_protocol(url), {})
    if not endpoint or ignored or "endpoint_url" in configured or "endpoint_url" in configured.get("client_kwargs", {}):
        return {}
    return {"endpoint_url": endpoint}


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of `url`, with `remote_options` applied."""
    return fsspec.core.url_to_fs(url, **remote_options(url))


def missing_backend(url: str, exc: ImportError) -> InputError:
    hint = " (pip install 'astolfo-dist[remote]')" if url_protocol(url) in _S3_PROTOCOLS else ""
    return InputError(url, f"cannot open URL: {exc}{hint}")


class FsspecReader:
    """Range reads through fsspec: only the bytes asked for are fetched, one request per read
    (`cat_file` with start/end). `fetched_bytes` counts what came from the remote.

    With `cache_dir`, reads go through fsspec's block cache instead ("blockcache": a sparse
    local file per remote file, filled RANGE_CACHE_BLOCK at a time, its filled blocks listed
    in a metadata file), so later merges of the same inputs read the blocks they already
    fetched from local disk. Details in `_RangeCache`.
    """

    def __init__(self, url: str, storage_options: dict | None = None, cache_dir: str | os.PathLike[str] | None = None):
        self.name = url
        self.fetched_bytes = 0
        self._count_lock = threading.Lock()
        try:
            options = remote_options(url) if storage_options is None else storage_options
            self._fs, self._path = fsspec.core.url_to_fs(url, **options)
            info = self._fs.info(self._path)
        except FileNotFoundError:
            raise InputError(url, "no such file") from None
        except PermissionError as exc:
            raise InputError(url, f"permission denied ({exc})") from None
        except ImportError as exc:
            raise missing_backend(url, exc) from None
        except ValueError as exc:
            raise InputError(url, f"cannot open URL: {exc}") from None
        if info.get("type") == "directory":
            raise InputError(url, "is a directory, expected a file")
        self.size = int(info["size"])
        self._cache: _RangeCache | None = None
        if cache_dir is not None and url_protocol(url) not in _UNCACHED_PROTOCOLS and self.size > 0:
            self._cache = _RangeCache.open(self, Path(cache_dir) / "ranges", info)

    def _count(self, n: int) -> None:
        with self._count_lock:
            self.fetched_bytes += n

    def read_into(self, offset: int, buf: memoryview) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        cache = self._cache
        if cache is not None and cache.read_into(offset, view):
            return
        data = self._fs.cat_file(self._path, start=offset, end=offset + len(view))
        self._count(len(data))
        _fill(self.name, offset, view, data)

    def prefetch(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        cache, self._cache = self._cache, None
        if cache is not None:
            cache.close()


class _RangeCache:
    """One remote file's blocks on local disk, through fsspec's CachingFileSystem ("blockcache").

    * Layout: `<cache-dir>/ranges/<key>/` holds fsspec's sparse data file and its `cache`
      metadata, for this one remote file. `key` hashes the protocol, path, size and version
      (ETag, else modification time) of the remote file and the block size: a remote file
      replaced under the same name gets a fresh folder. (fsspec's own `check_files` is not
      enough: it keeps the blocks listed by the old version's metadata, mixing old and new
      data; and it refuses a cached file reopened with another block size.)
    * Threads: one fsspec file object per remote file, `seek` + `read` under a lock. A miss is
      fetched under the lock too, so the workers reading one input wait for each other's
      misses (different inputs are fetched in parallel); hits are local reads.
    * Failures: fsspec marks blocks as cached before it fetches them. If a read fails, the
      reader stops using the cache (later reads are direct range requests) and the folder is
      deleted at close, so the blocks the failed fetch never wrote are not trusted later.
    * Processes: an exclusive `flock` on `<key>/lock` for the reader's life. A second process
      (or reader) for the same remote file reads directly rather than share the sparse file.
    * Memory: fsspec fills and reads the sparse file through a shared memory map; the pages a
      read touched are unmapped after it (MADV_DONTNEED, Linux), so the process's resident
      set does not grow with what is fetched.
    * A remote file whose `info` has no version (ETag, modification time) is not cached.
    * Once every block is fetched, fsspec marks the file complete; it is then read with
      pread(2) (no lock, no remote request).
    """

    def __init__(self, reader: FsspecReader, folder: Path, lock_fd: int) -> None:
        self.reader = reader
        self.folder = folder
        self._lock_fd = lock_fd
        self._lock = threading.Lock()
        self._file = None
        self._local: LocalFileReader | None = None
        self._blocks: set[int] = set()  # fsspec's list of the blocks held, shared with its metadata
        self._past_end: int | None = None
        self._mapped: mmap.mmap | None = None  # fsspec's map of the sparse file
        self.broken = False

    @classmethod
    def open(cls, reader: FsspecReader, root: Path, info: dict) -> _RangeCache | None:
        version = next((str(info[k]) for k in _VERSION_FIELDS if info.get(k) not in (None, "")), None)
        if version is None:
            log.info("%s: no version (ETag, modification time) to key a cache entry by; reading directly", reader.name)
            return None
        ident = json.dumps([reader._fs.protocol, reader._path, reader.size, version, RANGE_CACHE_BLOCK])
        folder = root / hashlib.sha256(ident.encode()).hexdigest()[:32]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            log.warning("%s: cannot use the range cache in %s (%s); reading directly", reader.name, root, exc)
            return None
        try:
            if fcntl is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            log.info("%s: its range cache %s is in use by another reader; reading directly", reader.name, folder)
            return None
        cache = cls(reader, folder, lock_fd)
        try:
            cache._open_file()
        except Exception as exc:  # a backend whose files the block cache cannot wrap
            log.warning("%s: range cache unavailable (%s: %s); reading directly", reader.name, type(exc).__name__, exc)
            cache.broken = True
            cache.close()
            return None
        return cache

    def _open_file(self) -> None:
        reader = self.reader
        cfs = fsspec.filesystem(
            "blockcache",
            fs=reader._fs,
            cache_storage=str(self.folder),
            check_files=False,  # the folder is keyed by the remote file's version
            expiry_time=False,
            skip_instance_cache=True,
        )
        f = cfs.open(reader._path, "rb", block_size=RANGE_CACHE_BLOCK)
        cache = getattr(f, "cache", None)
        if isinstance(cache, MMapCache):
            self._file = f  # closed by close() from here on, whatever happens next
            cache.fetcher = self._counted(cache.fetcher)
            if getattr(cache, "multi_fetcher", None) is not None:
                cache.multi_fetcher = self._counted_multi(cache.multi_fetcher)
            if f.size != reader.size:
                raise OSError(f"cached size {f.size} != remote size {reader.size}")
            # MMapCache takes the blocks of [start, end) as start//bs .. end//bs inclusive: a read
            # ending at the end of a file whose size is a multiple of the block size asks for a
            # block past the end (an empty range, which S3 refuses). Listed as held, it is never
            # fetched; it is taken out again before fsspec saves the list at close.
            if f.size % cache.blocksize == 0 and f.size // cache.blocksize not in cache.blocks:
                self._past_end = f.size // cache.blocksize
                cache.blocks.add(self._past_end)
            self._blocks = cache.blocks
            mapped = getattr(cache, "cache", None)
            if _DROP_MAPPED and isinstance(mapped, mmap.mmap):
                self._mapped = mapped
            return
        # Complete: fsspec hands back the local data file itself.
        path = f.name
        f.close()
        local = LocalFileReader(path)
        if local.size != reader.size:
            local.close()
            raise OSError(f"cached file has {local.size} bytes, the remote {reader.size}")
        local.name = reader.name
        self._local = local

    def _counted(self, fetch):
        def fetcher(start, end):
            data = fetch(start, end)
            self.reader._count(len(data))
            return data

        return fetcher

    def _counted_multi(self, fetch):
        def fetcher(ranges):
            parts = fetch(ranges)
            for part in parts:
                if isinstance(part, BaseException):  # cat_ranges returns errors, not raises
                    raise part
            self.reader._count(sum(len(p) for p in parts))
            return parts

        return fetcher

    def read_into(self, offset: int, view: memoryview) -> bool:
        """Fill `view` from byte `offset`; False when the cache is not usable (read directly)."""
        local = self._local
        if local is not None:
            local.read_into(offset, view)
            return True
        with self._lock:
            if self.broken or self._file is None:
                return False
            try:
                self._file.seek(offset)
                data = self._file.read(len(view))
            except BaseException:
                self.broken = True
                raise
            if self._mapped is not None:
                self._unmap(offset, offset + len(view))
        _fill(self.reader.name, offset, view, data)
        return True

    def _unmap(self, start: int, end: int) -> None:
        """Drop this process's mapping of the blocks the read touched (fetched or hit): the data
        stays in the page cache and the file, but not in the process's resident set, which
        would otherwise grow by every byte fetched. Blocks are page-aligned."""
        block = RANGE_CACHE_BLOCK
        begin = start // block * block
        stop = min((end // block + 1) * block, self.reader.size)
        self._mapped.madvise(mmap.MADV_DONTNEED, begin, stop - begin)

    def close(self) -> None:
        with self._lock:
            f, self._file = self._file, None
            local, self._local = self._local, None
        try:
            if f is not None:
                if self._past_end is not None:
                    self._blocks.discard(self._past_end)
                f.close()  # fsspec saves the list of filled blocks
            if local is not None:
                local.close()
        finally:
            if self.broken:
                shutil.rmtree(self.folder, ignore_errors=True)
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


# MADV_DONTNEED on a shared file mapping drops pages from the process, not their data (Linux).
_DROP_MAPPED = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")

# Fields of an fsspec `info` that change when a remote file is replaced, best first.
_VERSION_FIELDS = ("ETag", "etag", "VersionId", "md5Hash", "LastModified", "last_modified", "mtime", "created")


def _fill(name: str, offset: int, view: memoryview, data: bytes) -> None:
    if len(data) != len(view):
        raise InputError(name, f"short read at byte {offset} (was it truncated?)")
    view[:] = data


def open_reader(location: str, cache_dir: str | os.PathLike[str] | None = None) -> RangeReader:
    """A reader for a local path, `file://` URL or fsspec URL. With `cache_dir`, remote files
    are read through a block cache in `<cache_dir>/ranges` (local files are read directly)."""
    if location.startswith("file://"):
        location = location[len("file://") :]
    if is_url(location):
        return FsspecReader(location, cache_dir=cache_dir)
    return LocalFileReader(location)


def read_bytes(reader: RangeReader, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    reader.read_into(offset, memoryview(buf))
    return bytes(buf)
