"""s3:// inputs against a local S3: moto's server on 127.0.0.1 (a free port), configured the
standard way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). A merge of S3 objects and of a sharded
Hugging Face folder on S3 equals the merge of the same local files; only the byte ranges the
plan needs are fetched; missing objects are input errors naming the URL; with a cache folder a
second merge is served from local disk, a replaced object is fetched again, and a failed fetch
leaves nothing cached. Every request the server answers is logged (method, key, Range, body
bytes) by a WSGI wrapper, so what the readers claim to fetch is checked at the server too."""

from __future__ import annotations

import importlib
import logging
import os
import random
import threading
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import make_models
from safetensors.torch import load_file
from test_sources import merged_models, payload_sha256, write_sharded

from astolfo_dist import merge
from astolfo_dist.errors import InputError
from astolfo_dist.formats.header import read_header
from astolfo_dist.formats.readers import RANGE_CACHE_BLOCK, open_reader, read_bytes, remote_options
from astolfo_dist.formats.sources import HF_INDEX, resolve_model
from astolfo_dist.recipe.spec import MergeRecipe

s3fs = pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

merge_module = importlib.import_module("astolfo_dist.merge")  # the module, not the function

KEYS = 80  # the first keys of the SD1.5 layout (as in test_sources): quick, real names and ranks
BUCKET = "astolfo-remote-test"
# Keep 4 text-encoder MLP tensors (averaged) and position_ids (int64: copied, and compared
# across inputs); drop the rest, so the plan needs a small part of each file.
KEEP_FEW = r"^(?!(cond_stage_model\.transformer\.text_model\.encoder\.layers\.1\.mlp\.|.*position_ids$))"
_CLEARED_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
                "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_CA_BUNDLE", "AWS_REGION")
_SET_ENV = ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


class RequestLog:
    """WSGI middleware in front of moto's app: one entry per request, its body bytes counted
    before they are handed to the server (so a client that has its answer sees them counted)."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.entries: list[dict] = []

    def __call__(self, environ, start_response):
        entry = {"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
                 "range": environ.get("HTTP_RANGE"), "sent": 0}
        with self.lock:
            self.entries.append(entry)
        body = self.app(environ, start_response)
        try:
            for part in body:
                entry["sent"] += len(part)
                yield part
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def gets(self, suffix: str = ".safetensors") -> list[dict]:
        with self.lock:
            return [e for e in self.entries if e["method"] == "GET" and e["path"].endswith(suffix)]


class S3:
    def __init__(self, endpoint: str, log: RequestLog, client, local: dict[str, Path]) -> None:
        self.endpoint = endpoint
        self.log = log
        self.client = client
        self.local = local  # name -> the local file or folder uploaded under that name

    def url(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"

    def put(self, key: str, path: Path) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=Path(path).read_bytes())
        s3fs.S3FileSystem.clear_instance_cache()  # no listing cached before the change is reused


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1:<free port> holding a.safetensors, b.safetensors and the
    sharded folder hf-folder/; the AWS_* variables point at it for the module, then are restored."""
    root = tmp_path_factory.mktemp("remote")
    env_before = {var: os.environ.get(var) for var in _CLEARED_ENV + _SET_ENV}
    a, b, c = make_models(root / "in", ["F16", "F32", "BF16"], keys=KEYS)
    folder = root / "hf-folder"
    write_sharded(folder, load_file(str(c)))
    with pytest.MonkeyPatch.context() as mp:
        for var in _CLEARED_ENV:
            mp.delenv(var, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(root / "no-aws-config"))  # ignore the user's ~/.aws
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(root / "no-aws-credentials"))
        mp.setenv("AWS_ACCESS_KEY_ID", "astolfo-test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "astolfo-test-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        werkzeug_log = logging.getLogger("werkzeug")  # one line per request: keep failures readable
        level = werkzeug_log.level
        werkzeug_log.setLevel(logging.WARNING)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            log = RequestLog(server._server.app)
            server._server.app = log  # werkzeug's handler calls server.app for each request
            endpoint = f"http://{host}:{port}"
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            s3fs.S3FileSystem.clear_instance_cache()
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            ctx = S3(endpoint, log, client, {"a.safetensors": a, "b.safetensors": b, "hf-folder": folder})
            ctx.put("a.safetensors", a)
            ctx.put("b.safetensors", b)
            for f in sorted(folder.iterdir()):
                ctx.put(f"hf-folder/{f.name}", f)
            yield ctx
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()
            if server._server is not None:
                server._server.server_close()  # stop() leaves the listening socket open
            werkzeug_log.setLevel(level)
    assert {var: os.environ.get(var) for var in _CLEARED_ENV + _SET_ENV} == env_before


@pytest.fixture
def reference(s3, tmp_path) -> str:
    out = tmp_path / "local.safetensors"
    merge([str(s3.local[k]) for k in ("a.safetensors", "b.safetensors", "hf-folder")], out, workers=2)
    return payload_sha256(out)


@pytest.fixture
def opened(monkeypatch) -> list:
    """Every reader merge() opens, kept to read their fetched_bytes after the merge."""
    readers = []
    real = merge_module.open_reader

    def recording(location, *args, **kwargs):
        reader = real(location, *args, **kwargs)
        readers.append(reader)
        return reader

    monkeypatch.setattr(merge_module, "open_reader", recording)
    return readers


def urls(s3) -> list[str]:
    return [s3.url("a.safetensors"), s3.url("b.safetensors"), s3.url("hf-folder")]


def checkpoint_files(s3) -> list[Path]:
    """The local copies of the four .safetensors objects `urls` resolve to."""
    return [s3.local["a.safetensors"], s3.local["b.safetensors"], *sorted(s3.local["hf-folder"].glob("*.safetensors"))]


# --- configuration ----------------------------------------------------------------------------


def test_remote_options_take_the_endpoint_from_the_standard_variables(monkeypatch):
    for var in _CLEARED_ENV + ("AWS_ENDPOINT_URL",):
        monkeypatch.delenv(var, raising=False)
    assert remote_options("s3://b/k") == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert remote_options("s3://b/k") == {"endpoint_url": "http://127.0.0.1:1"}
    assert remote_options("s3a://b/k") == {"endpoint_url": "http://127.0.0.1:1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")  # the service-specific one wins
    assert remote_options("s3://b/k") == {"endpoint_url": "http://127.0.0.1:2"}
    assert remote_options("memory://x/y") == {} and remote_options("gcs://b/k") == {}
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert remote_options("s3://b/k") == {}


# --- merges -----------------------------------------------------------------------------------


def test_s3_merge_equals_the_local_merge(s3, tmp_path, reference):
    folder = s3.url("hf-folder")
    assert resolve_model(folder).files == (
        f"{folder}/model-00001-of-00002.safetensors",
        f"{folder}/model-00002-of-00002.safetensors",
    )
    out = tmp_path / "remote.safetensors"
    merge(urls(s3), out, workers=2)
    assert payload_sha256(out) == reference
    assert merged_models(out) == set(urls(s3))


def test_only_the_needed_ranges_are_fetched(s3, tmp_path, opened):
    s3.log.clear()
    result = merge(urls(s3), tmp_path / "few.safetensors", drop=[KEEP_FEW], workers=2)
    assert result.tensors == 5
    readers = {r.name: r for r in opened}
    assert len(readers) == len(opened) == 4  # a, b and the two shards, each opened once
    fetched = sum(r.fetched_bytes for r in opened)
    # The server agrees: what it sent for ranged GETs of the checkpoints is what the readers
    # counted; the one GET without a Range is the index JSON's, resolving the folder.
    assert sum(e["sent"] for e in s3.log.gets() if e["range"]) == fetched
    assert not [e for e in s3.log.gets() if not e["range"]]

    # What the plan needs: every file's header (8-byte length + JSON), and the plan's reads.
    recipe = MergeRecipe(models=tuple(urls(s3)), drop=(KEEP_FEW,))
    inputs = merge_module.Inputs(recipe, None)
    try:
        plan = merge_module.plan_merge(recipe, inputs)
        headers = sum(h.data_start for h in inputs.headers.values())
    finally:
        inputs.close()
    need = headers + plan.read_bytes
    # The same, independently, from the local files: headers + the kept tensors' bytes.
    local_files = checkpoint_files(s3)
    local_headers = [read_header(r) for r in map(open_reader, map(str, local_files))]
    kept = {n for h in local_headers for n in h.tensors if n.endswith("position_ids") or ".layers.1.mlp." in n}
    assert len(kept) == 5
    assert need == sum(h.data_start + sum(h.tensors[n].nbytes for n in kept if n in h.tensors) for h in local_headers)
    assert result.read_bytes == plan.read_bytes

    assert need <= fetched <= 1.05 * need, (fetched, need)
    sizes = sum(p.stat().st_size for p in local_files)
    assert fetched < 0.2 * sizes, (fetched, sizes)


def test_missing_objects_are_input_errors_naming_the_url(s3, tmp_path):
    out = tmp_path / "out.safetensors"
    missing = s3.url("nope.safetensors")
    with pytest.raises(InputError) as err:
        merge([s3.url("a.safetensors"), missing], out)
    assert missing in str(err.value)
    with pytest.raises(InputError) as err:
        open_reader(missing)
    assert str(err.value).startswith(missing + ":")
    other_bucket = f"s3://astolfo-no-such-bucket-{uuid.uuid4().hex[:8]}/a.safetensors"
    with pytest.raises(InputError) as err:
        merge([other_bucket, s3.url("a.safetensors")], out)
    assert other_bucket in str(err.value)
    # A sharded folder whose index names a shard that is not there.
    shard = s3.local["hf-folder"] / "model-00001-of-00002.safetensors"
    s3.put(f"broken-folder/{HF_INDEX}", s3.local["hf-folder"] / HF_INDEX)
    s3.put("broken-folder/model-00002-of-00002.safetensors", s3.local["hf-folder"] / "model-00002-of-00002.safetensors")
    with pytest.raises(InputError) as err:
        merge([s3.url("broken-folder"), s3.url("a.safetensors")], out)
    assert s3.url(f"broken-folder/{shard.name}") in str(err.value)
    assert not out.exists()


# --- the range cache --------------------------------------------------------------------------


def test_cache_dir_serves_a_second_merge_from_local_disk(s3, tmp_path, reference, opened):
    cache = tmp_path / "cache"
    sizes = sum(p.stat().st_size for p in checkpoint_files(s3))

    s3.log.clear()
    first = tmp_path / "first.safetensors"
    merge(urls(s3), first, workers=2, cache_dir=cache)
    assert payload_sha256(first) == reference
    assert len(opened) == 4
    assert (cache / "ranges").is_dir(), "merge() did not pass cache_dir to open_reader"
    # The files are smaller than a cache block: each is fetched whole, once.
    assert all(r.size < RANGE_CACHE_BLOCK for r in opened)
    assert sum(r.fetched_bytes for r in opened) == sizes
    assert sum(e["sent"] for e in s3.log.gets()) == sizes
    assert len(list((cache / "ranges").iterdir())) == 4

    opened.clear()
    s3.log.clear()
    second = tmp_path / "second.safetensors"
    merge(urls(s3), second, workers=2, cache_dir=cache)
    assert payload_sha256(second) == reference
    assert len(opened) == 4 and sum(r.fetched_bytes for r in opened) == 0
    assert s3.log.gets() == []  # no GET of a checkpoint at all: only HEADs and the index JSON
    assert len(list((cache / "ranges").iterdir())) == 4


def test_cache_fetches_a_replaced_object_again(s3, tmp_path):
    key = "replaced.safetensors"
    old, new = make_models(tmp_path / "in", ["F16", "F16"], keys=KEYS, seed0=7)
    assert old.stat().st_size == new.stat().st_size and old.read_bytes() != new.read_bytes()
    cache = tmp_path / "cache"
    s3.put(key, old)
    reader = open_reader(s3.url(key), cache_dir=cache)
    try:
        assert read_bytes(reader, 0, reader.size) == old.read_bytes()
    finally:
        reader.close()
    s3.put(key, new)  # same name and size, new content (and ETag)
    reader = open_reader(s3.url(key), cache_dir=cache)
    try:
        assert read_bytes(reader, 0, reader.size) == new.read_bytes()
        assert reader.fetched_bytes == reader.size
    finally:
        reader.close()


def test_a_failed_fetch_leaves_nothing_cached(s3, tmp_path):
    key = "flaky.safetensors"
    src = s3.local["a.safetensors"]
    s3.put(key, src)
    cache = tmp_path / "cache"
    reader = open_reader(s3.url(key), cache_dir=cache)
    try:
        s3.client.delete_object(Bucket=BUCKET, Key=key)  # the fetch of the first block fails
        with pytest.raises(FileNotFoundError):
            read_bytes(reader, 0, 8)
    finally:
        reader.close()
    left = list((cache / "ranges").iterdir())
    s3.put(key, src)  # the same bytes again: the same ETag, so the same cache entry
    reader = open_reader(s3.url(key), cache_dir=cache)
    try:
        # fsspec listed the block as cached before fetching it: trusted, it would read zeros.
        assert read_bytes(reader, 0, reader.size) == src.read_bytes()
        assert reader.fetched_bytes == reader.size
    finally:
        reader.close()
    assert left == []


def test_a_busy_cache_entry_is_read_directly(s3, tmp_path):
    url = s3.url("b.safetensors")
    first = open_reader(url, cache_dir=tmp_path / "cache")
    second = open_reader(url, cache_dir=tmp_path / "cache")
    try:
        expected = s3.local["b.safetensors"].read_bytes()
        assert read_bytes(first, 100, 1000) == read_bytes(second, 100, 1000) == expected[100:1100]
        assert first.fetched_bytes == first.size  # a whole block: the file
        assert second.fetched_bytes == 1000  # the entry is locked by the first: a direct range read
    finally:
        first.close()
        second.close()


def test_memory_urls_ignore_the_cache(tmp_path):
    fs = fsspec.filesystem("memory")
    root = f"/astolfo-test-{uuid.uuid4().hex}"
    fs.pipe(f"{root}/x.bin", bytes(range(256)) * 4)
    try:
        reader = open_reader(f"memory://{root}/x.bin", cache_dir=tmp_path / "cache")
        try:
            assert read_bytes(reader, 10, 20) == (bytes(range(256)) * 4)[10:30]
            assert reader.fetched_bytes == 20
        finally:
            reader.close()
        assert not (tmp_path / "cache").exists()
    finally:
        fs.rm(root, recursive=True)


def test_cached_reads_from_many_threads(s3, tmp_path):
    """One cached file object shared by 8 threads (seek + read under the reader's lock):
    every read returns the right bytes, and each block is fetched exactly once."""
    data = random.Random(5).randbytes(2 * RANGE_CACHE_BLOCK + 12345)  # three blocks, the last partial
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    s3.put("big.bin", src)
    cache = tmp_path / "cache"
    reader = open_reader(s3.url("big.bin"), cache_dir=cache)
    errors = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(40):
                start = rng.randrange(len(data))
                n = rng.randrange(1, 1 << 20)
                n = min(n, len(data) - start)
                assert read_bytes(reader, start, n) == data[start : start + n]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert read_bytes(reader, 0, len(data)) == data
        assert reader.fetched_bytes == len(data)
    finally:
        reader.close()
    # Complete now: the next reader reads the local copy and fetches nothing.
    s3.log.clear()
    reader = open_reader(s3.url("big.bin"), cache_dir=cache)
    try:
        assert read_bytes(reader, RANGE_CACHE_BLOCK - 10, 20) == data[RANGE_CACHE_BLOCK - 10 : RANGE_CACHE_BLOCK + 10]
        assert reader.fetched_bytes == 0
    finally:
        reader.close()
    assert s3.log.gets(".bin") == []


def test_a_file_of_whole_blocks_is_read_to_its_end(s3, tmp_path):
    """fsspec's block cache asks for a block past the end when a read ends at the end of a file
    whose size is a multiple of the block size (S3 refuses the empty range): not here."""
    data = random.Random(6).randbytes(2 * RANGE_CACHE_BLOCK)
    src = tmp_path / "whole.bin"
    src.write_bytes(data)
    s3.put("whole.bin", src)
    cache = tmp_path / "cache"
    reader = open_reader(s3.url("whole.bin"), cache_dir=cache)
    try:
        assert read_bytes(reader, len(data) - 200, 100) == data[-200:-100]
        assert reader.fetched_bytes == RANGE_CACHE_BLOCK  # the last block only
        assert read_bytes(reader, len(data) - 100, 100) == data[-100:]  # held: nothing to fetch
        assert reader.fetched_bytes == RANGE_CACHE_BLOCK
        assert read_bytes(reader, 0, len(data)) == data
        assert reader.fetched_bytes == len(data)
    finally:
        reader.close()
    reader = open_reader(s3.url("whole.bin"), cache_dir=cache)  # complete: read locally
    try:
        assert read_bytes(reader, 0, len(data)) == data and reader.fetched_bytes == 0
    finally:
        reader.close()
