"""Strict safetensors header reading: every malformed file is an InputError naming the file
(and the tensor), valid-but-unusual files give back the right bytes, and whatever we accept
the safetensors library accepts too, with the same bytes."""

from __future__ import annotations

import json
import os
import random
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from astolfo_dist.errors import InputError
from astolfo_dist.formats.dtypes import DTYPES
from astolfo_dist.formats.header import MAX_HEADER_BYTES, read_header
from astolfo_dist.formats.readers import open_reader, read_bytes

ANY_KEY = "<not checked>"  # the engine labels the duplicated field, not the tensor
KEY = "model.diffusion_model.out.2.weight"  # distinctive: it must show up in the message
OTHER = "first_stage_model.decoder.conv_in.bias"


def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    """One header entry; tuples become JSON lists, anything else is written as given."""
    fix = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {"dtype": dtype, "shape": fix(shape), "data_offsets": fix(offsets)}


def st_bytes(header: dict | str | bytes, data: bytes = b"", *, declared: int | None = None) -> bytes:
    """A file: 8-byte little-endian length (`declared` overrides it), the header, the data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    raw = header.encode("utf-8") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def raw_obj(*pairs: tuple[str, str]) -> str:
    """A JSON object from raw text: keys as given (escapes kept), values already JSON."""
    return "{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}"


def read(path: Path):
    reader = open_reader(str(path))
    try:
        return read_header(reader)
    finally:
        reader.close()


def read_back(path: Path, header, name: str) -> bytes:
    reader = open_reader(str(path))
    try:
        info = header.tensors[name]
        return read_bytes(reader, header.absolute(info), info.nbytes)
    finally:
        reader.close()


ONE = {KEY: entry()}  # one F32[2] tensor over 8 bytes
DATA8 = bytes(range(8))
ENTRY = json.dumps(entry())
_VALID = st_bytes(ONE, DATA8)

# (id, file bytes, tensor key the message must name or None, a fragment of the message)
MALFORMED = [
    ("empty-file", b"", None, "too small"),
    ("shorter-than-8", b"\x10\x00\x00", None, "too small"),
    ("header-len-0", struct.pack("<Q", 0) + b"{}" + DATA8, None, "header length 0"),
    ("absurd-header-len", st_bytes(ONE, DATA8, declared=2**40), None, "header length"),
    ("header-len-max-u64", st_bytes(ONE, DATA8, declared=2**64 - 1), None, "header length"),
    ("header-past-eof", st_bytes(ONE, DATA8, declared=len(_VALID) - 8 + 1), None, "past the end"),
    ("json-invalid", st_bytes('{"' + KEY + '":{"dtype":"F32",', DATA8), None, "not valid JSON"),
    ("json-trailing-garbage", st_bytes(json.dumps(ONE) + "}", DATA8), None, "not valid JSON"),
    ("json-list", st_bytes(json.dumps([entry()]), DATA8), None, "expected an object"),
    ("json-string", st_bytes('"hello"', DATA8), None, "expected an object"),
    ("invalid-utf8", st_bytes(b'{"\xff\xfe":' + json.dumps(entry()).encode() + b"}", DATA8), None, "UTF-8"),
    ("utf8-bom", st_bytes(b"\xef\xbb\xbf" + json.dumps(ONE).encode(), DATA8), None, "not valid JSON"),
    ("unknown-dtype", st_bytes({KEY: entry("F12")}, DATA8), KEY, "unknown dtype 'F12'"),
    ("lowercase-dtype", st_bytes({KEY: entry("f32")}, DATA8), KEY, "unknown dtype"),
    ("dtype-not-string", st_bytes({KEY: entry(4)}, DATA8), KEY, "unknown dtype"),
    ("negative-dim", st_bytes({KEY: entry(shape=[-2])}, DATA8), KEY, "shape"),
    ("float-dim", st_bytes({KEY: entry(shape=[2.5])}, DATA8), KEY, "shape"),
    ("integral-float-dim", st_bytes({KEY: entry(shape=[2.0])}, DATA8), KEY, "shape"),
    ("string-dim", st_bytes({KEY: entry(shape=["3"])}, DATA8), KEY, "shape"),
    ("bool-dim", st_bytes({KEY: entry(shape=[True, 2])}, DATA8), KEY, "shape"),
    ("shape-not-list", st_bytes({KEY: entry(shape=2)}, DATA8), KEY, "shape"),
    # JSON `-0` is a signed zero to the safetensors library (it reads a float and refuses it).
    ("negative-zero-dim", st_bytes(raw_obj((KEY, '{"dtype":"F32","shape":[2,-0],"data_offsets":[0,0]}'))), KEY,
     "shape"),
    ("negative-zero-offset", st_bytes(raw_obj((KEY, '{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}')), DATA8), KEY,
     "data_offsets"),
    # Dims are unsigned 64-bit: a zero-element tensor cannot smuggle a bigger one through.
    ("dim-over-u64", st_bytes({KEY: entry(shape=[2**64, 0], offsets=[0, 0])}), KEY, "shape"),
    ("span-too-small", st_bytes({KEY: entry(shape=[3], offsets=[0, 8])}, DATA8), KEY, "needs 12 bytes"),
    ("span-too-large", st_bytes({KEY: entry(shape=[1], offsets=[0, 8])}, DATA8), KEY, "needs 4 bytes"),
    ("sub-byte-odd-count", st_bytes({KEY: entry("F4", shape=[3], offsets=[0, 2])}, b"\0\0"), KEY,
     "do not fill whole bytes"),
    ("offsets-past-end", st_bytes({KEY: entry(shape=[4], offsets=[0, 16])}, DATA8), KEY, "data section has 8"),
    ("begin-past-end", st_bytes({KEY: entry(shape=[0], offsets=[12, 12])}, DATA8), KEY, "gap"),
    ("overlap", st_bytes({OTHER: entry(shape=[2], offsets=[0, 8]), KEY: entry(shape=[2], offsets=[4, 12])},
                         bytes(12)), KEY, "overlaps"),
    ("gap-between", st_bytes({OTHER: entry(shape=[1], offsets=[0, 4]), KEY: entry(shape=[1], offsets=[8, 12])},
                             bytes(12)), KEY, "gap of 4 bytes"),
    ("gap-at-start", st_bytes({KEY: entry(shape=[1], offsets=[4, 8])}, DATA8), KEY, "gap of 4 bytes"),
    ("trailing-bytes", st_bytes(ONE, DATA8 + b"\0\0\0"), None, "3 trailing bytes"),
    ("no-tensors-but-data", st_bytes({}, DATA8), None, "8 trailing bytes"),
    ("begin-gt-end", st_bytes({KEY: entry(shape=[0], offsets=[8, 0])}, DATA8), KEY, "0 <= begin <= end"),
    ("negative-offset", st_bytes({KEY: entry(offsets=[-8, 0])}, DATA8), KEY, "data_offsets"),
    ("three-offsets", st_bytes({KEY: entry(offsets=[0, 8, 8])}, DATA8), KEY, "data_offsets"),
    ("float-offset", st_bytes({KEY: entry(offsets=[0, 8.0])}, DATA8), KEY, "data_offsets"),
    ("metadata-number", st_bytes({"__metadata__": {"epoch": 3}, **ONE}, DATA8), None, "__metadata__"),
    ("metadata-nested", st_bytes({"__metadata__": {"a": {"b": "c"}}, **ONE}, DATA8), None, "__metadata__"),
    ("metadata-null", st_bytes({"__metadata__": None, **ONE}, DATA8), None, "__metadata__"),
    ("metadata-list", st_bytes({"__metadata__": ["a", "b"], **ONE}, DATA8), None, "__metadata__"),
    ("metadata-as-tensor", st_bytes({"__metadata__": entry(), **ONE}, DATA8 + DATA8), None, "__metadata__"),
    ("duplicate-key", st_bytes(raw_obj((KEY, ENTRY), (KEY, ENTRY)), DATA8), KEY, "duplicate key"),
    ("duplicate-field",
     st_bytes(raw_obj((KEY, '{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}')), DATA8),
     ANY_KEY, "duplicate key"),
    ("extra-field", st_bytes({KEY: {**entry(), "layout": "row-major"}}, DATA8), KEY, "unexpected fields ['layout']"),
    ("missing-data-offsets", st_bytes({KEY: {"dtype": "F32", "shape": [2]}}, DATA8), KEY, "missing ['data_offsets']"),
    ("missing-dtype", st_bytes({KEY: {"shape": [2], "data_offsets": [0, 8]}}, DATA8), KEY, "missing ['dtype']"),
    ("entry-not-object", st_bytes({KEY: [0, 8]}, DATA8), KEY, "not an object"),
    # Lone surrogates are not Unicode (safetensors refuses them; our own writer could not encode them).
    ("lone-surrogate-name", st_bytes(raw_obj(("\\ud800", ENTRY)), DATA8), None, "surrogate"),
    ("lone-surrogate-metadata", st_bytes(raw_obj(("__metadata__", '{"x":"\\udc00"}'), (KEY, ENTRY)), DATA8), None,
     "surrogate"),
]


@pytest.mark.parametrize("blob,key,fragment", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_header_is_input_error_naming_file_and_key(tmp_path, blob, key, fragment):
    path = tmp_path / "bad-input.safetensors"
    path.write_bytes(blob)
    with pytest.raises(InputError) as err:
        read(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert err.value.source == str(path)
    assert fragment in message, message
    if key is not ANY_KEY:
        assert err.value.key == key, message
    if key not in (None, ANY_KEY):
        assert repr(key) in message, message


def test_header_longer_than_limit_is_refused_before_reading_it(tmp_path):
    """A declared length just over the library's 100 MB cap, in a (sparse) file long enough to
    hold it: refused from the 8-byte prefix, without allocating or reading the header."""
    assert MAX_HEADER_BYTES == 100_000_000  # safetensors' own limit, in decimal megabytes
    path = tmp_path / "huge-header.safetensors"
    declared = MAX_HEADER_BYTES + 1
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", declared))
        f.truncate(8 + declared + 64)  # a hole: no disk space used
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as err:
            read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert str(path) in message
    assert f"header length {declared} is not in 1..{MAX_HEADER_BYTES}" in message
    assert peak < 8 << 20, f"reading the prefix allocated {peak} bytes"


def test_header_at_the_limit_is_read(tmp_path, monkeypatch):
    """The limit is inclusive: a header of exactly MAX_HEADER_BYTES is parsed (shrunk here)."""
    import astolfo_dist.formats.header as header_mod

    blob = st_bytes(ONE, DATA8)
    n = len(blob) - 8 - len(DATA8)
    monkeypatch.setattr(header_mod, "MAX_HEADER_BYTES", n)
    path = tmp_path / "at-limit.safetensors"
    path.write_bytes(blob)
    assert read(path).header_len == n
    monkeypatch.setattr(header_mod, "MAX_HEADER_BYTES", n - 1)
    with pytest.raises(InputError, match="is not in 1.."):
        read(path)


# --- valid but unusual --------------------------------------------------------------------


def _shape_for(name: str) -> list[int]:
    bits = DTYPES[name].bits
    if bits == 4:
        return [2, 2]  # 4 elements = 2 bytes
    if bits == 6:
        return [4]  # 4 elements = 3 bytes
    return [3]


def test_every_dtype_round_trips(tmp_path):
    rng = random.Random(7)
    names = list(DTYPES)
    rng.shuffle(names)  # offsets in an order unrelated to the dtype table
    header: dict = {"__metadata__": {"format": "pt", "note": "ünïcode ✓"}}
    data = bytearray()
    expected = {}
    for name in names:
        shape = _shape_for(name)
        nbytes = DTYPES[name].nbytes(shape[0] * (shape[1] if len(shape) > 1 else 1))
        payload = bytes(rng.randrange(256) for _ in range(nbytes))
        key = f"t.{name.lower()}"
        header[key] = entry(name, shape, [len(data), len(data) + nbytes])
        expected[key] = (name, tuple(shape), len(data), len(data) + nbytes, payload)
        data += payload
    path = tmp_path / "all-dtypes.safetensors"
    path.write_bytes(st_bytes(header, bytes(data)))

    parsed = read(path)
    assert parsed.metadata == {"format": "pt", "note": "ünïcode ✓"}
    assert set(parsed.tensors) == set(expected)
    assert {DTYPES[n].nbytes(4) for n in ("F6_E2M3", "F6_E3M2")} == {3}
    for key, (dtype_name, shape, begin, end, payload) in expected.items():
        info = parsed.tensors[key]
        assert (info.dtype.name, info.shape, info.begin, info.end) == (dtype_name, shape, begin, end)
        assert info.nbytes == len(payload)
        assert read_back(path, parsed, key) == payload


def test_unpadded_header(tmp_path):
    header = {KEY: entry("F16", [3], [0, 6]), "b": entry("U8", [2], [6, 8])}
    raw = json.dumps(header, separators=(",", ":"))
    raw += " " * ((-len(raw) % 8) + 3)  # deliberately 3 bytes off an 8-byte boundary
    assert len(raw) % 8 == 3
    path = tmp_path / "unpadded.safetensors"
    path.write_bytes(st_bytes(raw, b"ABCDEFgh"))
    parsed = read(path)
    assert parsed.header_len == len(raw)
    assert parsed.data_start == 8 + len(raw)
    assert read_back(path, parsed, KEY) == b"ABCDEF"
    assert read_back(path, parsed, "b") == b"gh"
    assert parsed.metadata == {}


def test_zero_size_tensors(tmp_path):
    header = {
        "empty": entry("F32", [0, 3], [0, 0]),
        KEY: entry("BF16", [2], [0, 4]),
        "empty.tail": entry("I64", [5, 0, 2], [4, 4]),
    }
    path = tmp_path / "zero-size.safetensors"
    path.write_bytes(st_bytes(header, b"\x01\x02\x03\x04"))
    parsed = read(path)
    empty = parsed.tensors["empty"]
    assert (empty.dtype.name, empty.shape, empty.begin, empty.end, empty.numel) == ("F32", (0, 3), 0, 0, 0)
    tail = parsed.tensors["empty.tail"]
    assert (tail.shape, tail.begin, tail.end) == ((5, 0, 2), 4, 4)
    assert read_back(path, parsed, "empty") == b""
    assert read_back(path, parsed, KEY) == b"\x01\x02\x03\x04"
    # Only zero-size tensors: an empty data section.
    only = tmp_path / "only-empty.safetensors"
    only.write_bytes(st_bytes({"empty": entry("F16", [0], [0, 0])}))
    assert read(only).tensors["empty"].nbytes == 0


def test_metadata_and_scalar(tmp_path):
    header = {"__metadata__": {"format": "pt", "ss_steps": "1000"}, "scalar": entry("F64", [], [0, 8])}
    path = tmp_path / "meta.safetensors"
    path.write_bytes(st_bytes(header, DATA8))
    parsed = read(path)
    assert parsed.metadata == {"format": "pt", "ss_steps": "1000"}
    assert parsed.tensors["scalar"].shape == ()
    assert read_back(path, parsed, "scalar") == DATA8


def test_file_written_by_safetensors(tmp_path):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "ids": torch.arange(4, dtype=torch.int64)}
    path = tmp_path / "lib.safetensors"
    path.write_bytes(save_bytes(tensors, metadata={"k": "v"}))
    parsed = read(path)
    assert parsed.metadata == {"k": "v"}
    assert parsed.header_len % 8 == 0
    for name, t in tensors.items():
        assert read_back(path, parsed, name) == t.numpy().tobytes()


# --- property: whatever we accept, safetensors accepts, with the same bytes ---------------

BASE_TENSORS = {
    "a.f16": torch.linspace(-2, 2, 6).to(torch.float16).reshape(2, 3),
    "b.bf16": torch.linspace(-1, 3, 4).to(torch.bfloat16),
    "c.f32": torch.linspace(0, 1, 6).reshape(3, 2),
    "d.i64": torch.arange(3, dtype=torch.int64),
    "e.u8": torch.arange(5, dtype=torch.uint8),
}
BASE = save_bytes(BASE_TENSORS, metadata={"format": "pt", "name": "base"})
# Bytes that keep a JSON header JSON-like often enough for mutants to parse.
JSONISH = st.sampled_from(list(b'0123456789 ,:[]{}"-.eE\\uFIU'))
_DATA_START = 8 + struct.unpack("<Q", BASE[:8])[0]
# Where to hit: anywhere, the data section (the file stays valid: the bytes must follow), or
# the header's digits and dtype letters (shapes, offsets and dtypes that may still agree).
_HOT = [i for i in range(8, _DATA_START) if BASE[i] in b"0123456789FIUB"]
POSITION = st.one_of(
    st.integers(0, len(BASE) - 1), st.integers(_DATA_START, len(BASE) - 1), st.sampled_from(_HOT)
)
MUTATION = st.one_of(
    st.tuples(
        st.just("overwrite"),
        st.lists(st.tuples(POSITION, st.one_of(st.integers(0, 255), JSONISH)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("truncate"), st.integers(0, len(BASE) - 1)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
)


def _mutate(kind: str, arg) -> bytes:
    if kind == "truncate":
        return BASE[:arg]
    if kind == "append":
        return BASE + arg
    out = bytearray(BASE)
    for pos, byte in arg:
        out[pos] = byte
    return bytes(out)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_base_file_is_accepted_by_both():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.safetensors"
        path.write_bytes(BASE)
        parsed = read(path)
        assert set(parsed.tensors) == set(BASE_TENSORS)
        for name, t in BASE_TENSORS.items():
            assert read_back(path, parsed, name) == _raw(t)


@settings(max_examples=200, deadline=None, database=None)
@given(MUTATION)
def test_mutated_files_are_rejected_cleanly_or_agree_with_safetensors(mutation):
    blob = _mutate(*mutation)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mutant.safetensors"
        path.write_bytes(blob)
        try:
            parsed = read(path)
        except InputError as exc:
            assert str(path) in str(exc)
            event("rejected")
            return
        event("accepted")
        # We accepted it: the reference library must too, tensor for tensor, byte for byte.
        with safe_open(str(path), framework="pt") as f:
            assert set(f.keys()) == set(parsed.tensors)
            assert (f.metadata() or {}) == parsed.metadata
            for name, info in parsed.tensors.items():
                sl = f.get_slice(name)
                assert sl.get_dtype() == info.dtype.name
                assert tuple(sl.get_shape()) == info.shape
                assert read_back(path, parsed, name) == _raw(f.get_tensor(name)), name
        assert os.path.getsize(path) == parsed.data_start + max((i.end for i in parsed.tensors.values()), default=0)


def test_headers_parsed_together_share_names_and_shapes():
    """The inputs of a merge have the same keys: with a `shared` dict their headers hold one
    copy of each name and shape, not one per input (the plan's per-input memory)."""
    from astolfo_dist.formats.header import parse_header_bytes

    header = {KEY: entry(shape=(2,)), OTHER: entry(shape=(1, 2), offsets=(8, 16))}
    raw = json.dumps(header).encode()
    size = 8 + len(raw) + 16
    shared: dict[object, object] = {}
    a, b = (parse_header_bytes(f"m{i}", raw, size, shared) for i in range(2))
    for name in (KEY, OTHER):
        info_a, info_b = a.tensors[name], b.tensors[name]
        assert info_a == info_b
        assert info_a.name is info_b.name and info_a.shape is info_b.shape
        assert next(k for k in b.tensors if k == name) is info_a.name  # the dict keys too
    unshared = parse_header_bytes("m", raw, size)
    assert unshared.tensors == a.tensors and unshared.tensors[KEY].name is not a.tensors[KEY].name
