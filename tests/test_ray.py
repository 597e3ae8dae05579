"""Ray executor on a real multi-node cluster (ray.cluster_utils.Cluster, 3 nodes on this
machine): the same bytes as the in-process executor for both sinks and sharded output, and
through the loss of a node. Nothing started here outlives the module; no `ray stop`."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import psutil
import pytest
from conftest import make_models, one_pass_read_bytes, sha256

from astolfo_dist import InputError, merge
from astolfo_dist.journal import journal_path

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 80 << 20, "include_dashboard": False}


def _ours(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="module")
def cluster():
    # A short private temp dir: Ray's unix sockets live there, and ps can find our processes.
    # Cluster also writes its address to <RAY_TMPDIR or /tmp>/ray/ray_current_cluster, whatever
    # temp_dir says: pointed into ours, it neither needs /tmp/ray to exist (a fresh machine has
    # none) nor overwrites the address another Ray user on this machine left there.
    temp_dir = tempfile.mkdtemp(prefix="adr-", dir="/tmp")
    os.makedirs(os.path.join(temp_dir, "ray"))
    previous_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    c = Cluster(initialize_head=True, head_node_args={**NODE, "temp_dir": temp_dir}, shutdown_at_exit=True)
    workers = [c.add_node(**NODE) for _ in range(2)]
    c.wait_for_nodes()
    c.temp_dir = temp_dir
    c.test_workers = workers
    try:
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        if previous_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous_tmpdir
        deadline = time.monotonic() + 30
        while _ours(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _ours(temp_dir)
        if not left:
            shutil.rmtree(temp_dir, ignore_errors=True)  # the nodes' logs and sockets
        assert not left, f"Ray processes left running: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return [str(p) for p in make_models(tmp_path_factory.mktemp("ray-in"), ["F16", "BF16", "F16"], scale=16)]


@pytest.fixture(scope="module")
def local_reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-ref") / "local.safetensors"
    merge(inputs, out, shard_mb=0.25)
    return out


def _alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


@pytest.mark.parametrize("sink", ["direct", "writer", "auto"])
def test_cluster_merge_equals_local(cluster, inputs, local_reference, tmp_path, sink):
    out = tmp_path / f"{sink}.safetensors"
    merge(inputs, out, executor="ray", address=cluster.address, sink=sink, shard_mb=0.25)
    assert sha256(out) == sha256(local_reference)
    assert not ray.is_initialized()  # the driver disconnected; the cluster is still up
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        assert _alive_nodes() == 3
    finally:
        ray.shutdown()


def test_cluster_method_with_tensor_cache_equals_local(cluster, inputs, tmp_path):
    """A multi-pass method on the cluster, its tasks keeping each tensor's inputs between
    passes (--tensor-cache-mb reaches them): the local bytes, every input byte read once."""
    args = dict(method="ties", base=inputs[-1], params={"density": 0.3}, shard_mb=0.25)
    local, remote = tmp_path / "local.safetensors", tmp_path / "remote.safetensors"
    merged_locally = merge(inputs[:-1], local, **args)
    merged = merge(inputs[:-1], remote, executor="ray", address=cluster.address, tensor_cache_mb=64, **args)
    assert sha256(remote) == sha256(local)
    once = one_pass_read_bytes(inputs[:-1], inputs[-1], tmp_path / "once.safetensors")
    assert merged.read_bytes == once < merged_locally.read_bytes


@pytest.mark.parametrize("sink", ["direct", "writer"])
def test_cluster_sharded_output_equals_local(cluster, inputs, tmp_path, sink):
    local = tmp_path / "local"
    remote = tmp_path / "remote"
    merge(inputs, local, shard_size=400_000)
    merge(inputs, remote, executor="ray", address=cluster.address, sink=sink, shard_size=400_000, shard_mb=0.25)
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in remote.iterdir()) and len(names) > 2
    for name in names:
        assert sha256(local / name) == sha256(remote / name), name


def test_losing_a_node_mid_merge_keeps_the_bytes(cluster, tmp_path_factory, tmp_path):
    inputs = [str(p) for p in make_models(tmp_path_factory.mktemp("ray-loss"), ["F32"] * 3, scale=8)]
    reference = tmp_path / "reference.safetensors"
    merge(inputs, reference, shard_mb=0.5)
    out = tmp_path / "out.safetensors"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            merge(inputs, out, executor="ray", address=cluster.address, sink="writer", shard_mb=0.5, chunk_mb=0.02)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    journal = journal_path(out)
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert thread.is_alive(), "the merge ended before a node could be removed"
    victim = cluster.test_workers.pop()
    cluster.remove_node(victim, allow_graceful=False)
    thread.join(timeout=300)
    assert not thread.is_alive() and not errors, errors
    assert sha256(out) == sha256(reference)
    cluster.test_workers.append(cluster.add_node(**NODE))  # back to three nodes for later tests
    cluster.wait_for_nodes()


def test_input_changed_on_a_node_is_refused(cluster, inputs, tmp_path):
    """Every task checks its inputs against the plan (size and header digest)."""
    import shutil

    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(inputs[0], copy)
    from astolfo_dist.executors.ray import _checked_readers
    from astolfo_dist.merge import plan_for
    from astolfo_dist.recipe import MergeRecipe

    recipe = MergeRecipe(models=(str(copy), inputs[1]))
    plan = plan_for(recipe)
    raw = copy.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    # Same size, another header: what a different file at the same path on a node looks like.
    renamed = raw[8 : 8 + n].replace(b'"cond_stage_model.', b'"COND_stage_model.', 1)
    assert len(renamed) == n and renamed != raw[8 : 8 + n]
    copy.write_bytes(raw[:8] + renamed + raw[8 + n :])
    with pytest.raises(InputError, match="header differs"):
        _checked_readers(plan, {str(copy)})
    copy.write_bytes(raw[:-2])
    with pytest.raises(InputError, match="bytes on node"):
        _checked_readers(plan, {str(copy)})


def test_assign_nodes_places_shards_on_holders_balanced_by_bytes():
    from astolfo_dist.executors.ray import assign_nodes

    nodes = ["a", "b", "c"]
    holders = {"x": {"a", "b"}, "y": {"b", "c"}, "z": {"a", "b", "c"}}
    needs = {0: {"x"}, 1: {"y"}, 2: {"x", "y"}, 3: {"z"}, 4: {"z"}, 5: {"x"}}
    cost = {i: 10 for i in needs}
    placed = assign_nodes(needs, cost, holders, nodes)
    assert all(placed[i] in set.intersection(*(holders[f] for f in needs[i])) for i in needs)
    assert placed[2] == "b"  # the only node holding both
    assert len(set(placed.values())) == 3  # spread by load
    everywhere = {f: set(nodes) for f in holders}
    assert set(assign_nodes(needs, cost, everywhere, nodes).values()) == {None}
    with pytest.raises(InputError, match="no alive node holds every input of shard 0"):
        assign_nodes({0: {"x", "w"}}, {0: 1}, {**holders, "w": {"c"}}, nodes)


def test_probe_finds_where_inputs_are(cluster, inputs, tmp_path):
    import shutil

    from astolfo_dist.executors.ray import assign_nodes, probe_holders, shard_files
    from astolfo_dist.merge import plan_for
    from astolfo_dist.recipe import MergeRecipe
    from astolfo_dist.shards import make_shards

    gone = tmp_path / "gone.safetensors"
    shutil.copyfile(inputs[0], gone)
    recipe = MergeRecipe(models=(str(gone), inputs[1]))
    plan = plan_for(recipe)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        nodes, holders = probe_holders(plan)
        assert len(nodes) == 3 and all(h == set(nodes) for h in holders.values())
        gone.unlink()  # now no node holds it
        nodes, holders = probe_holders(plan)
        assert holders[str(gone)] == set() and holders[inputs[1]] == set(nodes)
        shards = make_shards(plan)
        with pytest.raises(InputError, match="gone.safetensors.*no alive node holds"):
            assign_nodes({s.index: shard_files(plan, s) for s in shards}, {s.index: 1 for s in shards}, holders, nodes)
    finally:
        ray.shutdown()


def test_writer_sink_spills_to_the_spill_dir_and_leaves_it_empty(tmp_path_factory, tmp_path):
    """A private local Ray whose object store is far smaller than the chunks in flight to
    the writer: objects spill to --spill-dir, the merge is right, the folder ends empty."""
    inputs = [str(p) for p in make_models(tmp_path_factory.mktemp("spill"), ["F32"] * 2, scale=4)]
    reference = tmp_path / "reference.safetensors"
    merge(inputs, reference)
    spill = tmp_path / "spill"
    out = tmp_path / "out.safetensors"
    result = merge(inputs, out, executor="ray", sink="writer", spill_dir=str(spill), object_store_mb=80,
                   writer_inflight_mb=600, workers=2, memory="8GiB")
    assert sha256(out) == sha256(reference)
    assert result.written_bytes > 80 << 20  # more output than the store holds passed through it
    leftovers = [p for p in spill.rglob("*") if p.is_file()]
    assert not leftovers, leftovers
