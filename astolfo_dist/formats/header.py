"""Strict safetensors header parsing, and the byte layout the safetensors library writes.

Every check here happens before any tensor byte is read, and every failure names the file
(and the tensor). The rules are the format's own (8-byte little-endian length, a JSON
object, known dtypes, in-bounds contiguous offsets, str->str metadata) plus a size cap.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import InputError
from .dtypes import DTYPES, DType
from .readers import RangeReader, read_bytes

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (100 MB, not MiB)
MAX_U64 = 2**64 - 1  # shape dims and offsets are unsigned 64-bit integers in the format
METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    source: str
    header_len: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    digest: str = ""  # sha256 of the header bytes: identifies the file without reading its data

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def absolute(self, info: TensorInfo) -> int:
        return self.data_start + info.begin


def _reject_duplicates(source: str):
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            for text in (key, value) if isinstance(value, str) else (key,):
                if not _is_unicode(text):
                    raise InputError(source, "header holds a string with a lone surrogate escape (not Unicode)")
            if key in out:
                raise InputError(source, "duplicate key in header", key=key)
            out[key] = value
        return out

    return hook


def _is_unicode(text: str) -> bool:
    """False for strings with lone surrogates (a `\\ud800` escape), which are not Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_int(text: str) -> int | float:
    """JSON `-0` is a signed zero, not an unsigned integer: keep it a float so it is rejected."""
    value = int(text)
    return -0.0 if value == 0 and text.startswith("-") else value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value <= MAX_U64


def _parse_entry(source: str, name: str, entry: object, shared: dict[object, object] | None = None) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InputError(source, "header entry is not an object", key=name)
    if set(entry) != _ENTRY_FIELDS:
        missing = sorted(_ENTRY_FIELDS - set(entry))
        extra = sorted(set(entry) - _ENTRY_FIELDS)
        what = f"missing {missing}" if missing else f"unexpected fields {extra}"
        raise InputError(source, f"header entry has {what}", key=name)
    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise InputError(source, f"unknown dtype {dtype_name!r}", key=name)
    dtype = DTYPES[dtype_name]
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InputError(source, f"shape {shape!r} is not a list of non-negative integers", key=name)
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InputError(source, f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end", key=name)
    numel = math.prod(shape)
    nbytes = dtype.nbytes(numel)
    if nbytes is None:
        raise InputError(source, f"{numel} elements of {dtype_name} do not fill whole bytes", key=name)
    if offsets[1] - offsets[0] != nbytes:
        raise InputError(
            source,
            f"shape {shape} x {dtype_name} needs {nbytes} bytes but data_offsets span {offsets[1] - offsets[0]}",
            key=name,
        )
    dims = tuple(shape)
    if shared is not None:  # one object per distinct name and shape across the headers
        name = shared.setdefault(name, name)  # type: ignore[assignment]
        dims = shared.setdefault(dims, dims)  # type: ignore[assignment]
    return TensorInfo(name, dtype, dims, offsets[0], offsets[1])


def parse_header_bytes(
    source: str, raw: bytes, file_size: int, shared: dict[object, object] | None = None
) -> Header:
    """Validate a header already read: `raw` is the JSON bytes after the 8-byte length.

    `shared`: a dict kept while several headers are parsed (the inputs of one merge): equal
    tensor names and shapes then share one object, which keeps N headers of the same
    architecture from holding N copies of every key (about a third of a parsed header)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(source, "header is not valid UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates(source), parse_int=_parse_int)
    except InputError:
        raise
    except (ValueError, RecursionError) as exc:
        raise InputError(source, f"header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InputError(source, f"header is a JSON {type(obj).__name__}, expected an object")
    metadata = obj.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(source, "__metadata__ must map strings to strings")
    tensors = {}
    for name, entry in obj.items():
        info = _parse_entry(source, name, entry, shared)
        tensors[info.name] = info
    data_len = file_size - 8 - len(raw)
    _check_coverage(source, tensors.values(), data_len)
    return Header(source, len(raw), file_size, tensors, dict(metadata), hashlib.sha256(raw).hexdigest())


def _check_coverage(source: str, tensors: Iterable[TensorInfo], data_len: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing past the end."""
    cursor = 0
    for info in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if info.begin > cursor:
            raise InputError(source, f"gap of {info.begin - cursor} bytes before this tensor", key=info.name)
        if info.begin < cursor:
            raise InputError(source, "data overlaps the previous tensor", key=info.name)
        if info.end > data_len:
            raise InputError(
                source, f"data ends at byte {info.end} but the data section has {data_len} bytes", key=info.name
            )
        cursor = info.end
    if cursor != data_len:
        raise InputError(source, f"{data_len - cursor} trailing bytes after the last tensor")


def read_header(reader: RangeReader, shared: dict[object, object] | None = None) -> Header:
    source, size = reader.name, reader.size
    if size < 8:
        raise InputError(source, f"file has {size} bytes, too small to be a safetensors file")
    (n,) = struct.unpack("<Q", read_bytes(reader, 0, 8))
    if n == 0 or n > MAX_HEADER_BYTES:
        raise InputError(source, f"header length {n} is not in 1..{MAX_HEADER_BYTES} (not a safetensors file?)")
    if 8 + n > size:
        raise InputError(source, f"header length {n} runs past the end of the {size}-byte file")
    return parse_header_bytes(source, read_bytes(reader, 8, n), size, shared)


# --- output layout -------------------------------------------------------------------------


def layout_order(entries: Iterable[tuple[str, DType]]) -> list[str]:
    """The safetensors serializer's order: dtype rank descending, then name."""
    return [name for name, dt in sorted(entries, key=lambda e: (-e[1].rank, e[0]))]


def build_header(
    tensors: list[tuple[str, DType, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (length prefix included, space-padded to 8) and each tensor's data offsets.

    `tensors` must already be in layout order. Metadata keys are sorted: the safetensors
    library writes them in hash-map order, which changes from run to run, and we want the
    same recipe to give the same bytes.
    """
    body: dict[str, object] = {}
    if metadata:
        body[METADATA_KEY] = dict(sorted(metadata.items()))
    offsets = []
    cursor = 0
    for name, dt, shape in tensors:
        nbytes = dt.nbytes(math.prod(shape))
        assert nbytes is not None
        offsets.append((cursor, cursor + nbytes))
        body[name] = {"dtype": dt.name, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
