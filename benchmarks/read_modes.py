"""How a worker reads its input chunks: positioned reads into a reused buffer, or a memory map.

Run from the repository root:

    .venv/bin/python benchmarks/read_modes.py [--models 8] [--scale 2] [--threads 2] [--chunk-elems 524288]
        [--passes 3] [--repeats 5] [--dir benchmarks/work/read_modes]
        [--json benchmarks/results/read_modes.json] [--markdown benchmarks/results/read_modes.md] [--keep]

Makes N fp16 checkpoints with the SD1.5 layout (`astolfo_dist.synthetic.make_state_dict`; ~257 MB
each at --scale 2), warms the page cache with them, then runs the engine's access pattern in a
fresh subprocess per mode: every float tensor cut in chunks of --chunk-elems elements, the chunks
grouped in 64 contiguous shards that --threads worker threads take in turn; for each chunk, each
input's chunk is read in input order and reduced (the first `copy_` into a float32 accumulator,
the others `copy_` to float32 scratch and `add_`). The modes differ only in how a chunk is read:

* `pread`: `os.preadv` into one buffer per thread, reused (what the engine does);
* `mmap+madvise`: every file mapped whole (`mmap`, read-only), the chunk taken with
  `torch.frombuffer`, and its pages dropped from the process with `madvise(MADV_DONTNEED)` once
  it is added, so mapped pages do not pile up in the RSS;
* `mmap`: the same without the `madvise`: every page touched stays mapped, and counted in the RSS.

Per mode: GB/s of input reduced (in the subprocess, after its start-up; --passes over all inputs),
the peak RSS of the subprocess (sampled every ~20 ms, and its ru_maxrss through throughput.py's
launcher) and its RSS split (anonymous / file-backed) at the end of the last pass. The runs
alternate between modes, --repeats times; a checksum of the accumulators shows every mode reduced
the same bytes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import mmap
import os
import platform
import shutil
import statistics
import struct
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

MODES = ("pread", "mmap+madvise", "mmap")
SHARDS = 64  # like the engine's default: the plan cut in 64 shards
GEN_VERSION = "1"  # bump when the generator's output changes, so old files are not reused
MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[read_modes] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the measured loop (child)


def read_header(path: str) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def plan(paths: list[str], chunk: int) -> tuple[list[list[tuple[list[int], int]]], int]:
    """Shards of work items (per-input byte offsets of the chunk, element count), in the first
    input's data order; and the input bytes of one pass."""
    headers = [read_header(p) for p in paths]
    first_start, first = headers[0]
    keys = [k for k, v in first.items() if k != "__metadata__" and v["dtype"] == "F16"]
    keys.sort(key=lambda k: first[k]["data_offsets"][0])
    items: list[tuple[list[int], int]] = []
    for key in keys:
        numel = math.prod(first[key]["shape"])
        bases = []
        for path, (start, header) in zip(paths, headers, strict=True):
            info = header.get(key)
            if info is None or info["dtype"] != "F16" or info["shape"] != first[key]["shape"]:
                raise SystemExit(f"{path}: {key} missing or not the F16 {first[key]['shape']} of {paths[0]}")
            bases.append(start + info["data_offsets"][0])
        for s in range(0, numel, chunk):
            items.append(([b + s * 2 for b in bases], min(chunk, numel - s)))
    per_shard = math.ceil(len(items) / SHARDS)
    shards = [items[i : i + per_shard] for i in range(0, len(items), per_shard)]
    return shards, sum(n for _, n in items) * 2 * len(paths)


def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[name] = round(int(value.split()[0]) / 1024, 3)  # kB
    return out


def child(mode: str, paths: list[str], threads: int, chunk: int, passes: int) -> dict:
    torch.set_num_threads(1)  # the engine's workers each run single-threaded torch ops
    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # frombuffer on a read-only map
    shards, pass_bytes = plan(paths, chunk)
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    maps = [mmap.mmap(fd, 0, access=mmap.ACCESS_READ) for fd in fds] if mode != "pread" else []
    page = mmap.PAGESIZE
    local = threading.local()
    before = proc_status()

    def run_shard(shard: list[tuple[list[int], int]]) -> float:
        st = getattr(local, "st", None)
        if st is None:
            raw = torch.empty(chunk * 2, dtype=torch.uint8)
            st = local.st = (
                raw,
                memoryview(raw.numpy()),
                raw.view(torch.float16),
                torch.empty(chunk, dtype=torch.float32),
                torch.empty(chunk, dtype=torch.float32),
            )
        _raw, buf, buf16, acc_full, tmp_full = st
        check = 0.0
        for offsets, n in shard:
            acc, tmp = acc_full[:n], tmp_full[:n]
            nbytes = n * 2
            for i, off in enumerate(offsets):
                if mode == "pread":
                    done = 0
                    while done < nbytes:
                        got = os.preadv(fds[i], [buf[done:nbytes]], off + done)
                        if got == 0:
                            raise SystemExit(f"{paths[i]}: short read at {off + done}")
                        done += got
                    x = buf16[:n]
                else:
                    x = torch.frombuffer(maps[i], dtype=torch.float16, count=n, offset=off)
                if i == 0:
                    acc.copy_(x)
                else:
                    tmp.copy_(x)
                    acc.add_(tmp)
                if mode == "mmap+madvise":
                    del x
                    begin = off - off % page
                    maps[i].madvise(mmap.MADV_DONTNEED, begin, off + nbytes - begin)
            check += float(acc[n - 1])
        return check

    seconds = []
    checks = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(passes):
            t0 = time.perf_counter()
            checks.append(math.fsum(pool.map(run_shard, shards)))
            seconds.append(time.perf_counter() - t0)
    end = proc_status()  # before unmapping: what the maps hold at the end of the last pass
    local.__dict__.clear()
    for m in maps:
        m.close()
    for fd in fds:
        os.close(fd)
    total = sum(seconds)
    return {
        "mode": mode,
        "pass_bytes": pass_bytes,
        "pass_seconds": [round(s, 4) for s in seconds],
        "gbps": round(pass_bytes * passes / total / 1e9, 3),
        "gbps_best_pass": round(pass_bytes / min(seconds) / 1e9, 3),
        "checksum": checks[0],
        "checksums_agree": len(set(checks)) == 1,
        "status_before_mib": before,
        "status_end_mib": end,
        "chunks_per_pass": sum(len(s) for s in shards),
    }


def fault_granularity(path: str, probes: int = 8) -> list[int]:
    """KiB that one read fault maps into this process, at a few offsets of a warm file: more than a
    page when the kernel maps a whole page-cache folio or a fault-around window. What a chunk's
    madvise then leaves mapped is what such a fault mapped beyond the chunk's ends."""
    out = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for k in range(probes):
            off = (len(m) * (2 * k + 1) // (2 * probes)) // mmap.PAGESIZE * mmap.PAGESIZE
            before = proc_status()["RssFile"]
            m[off]  # noqa: B018 - the read is the point: it faults the page in
            out.append(round((proc_status()["RssFile"] - before) * 1024))
            m.madvise(mmap.MADV_DONTNEED, 0, len(m))
    return out


# ----------------------------------------------------------------------------- inputs (parent)


def tag(scale: int, seed: int) -> str:
    return json.dumps(
        {"gen": f"make_state_dict/{GEN_VERSION}", "layout": "sd15", "scale": scale, "seed": seed, "dtype": "F16"},
        sort_keys=True,
    )


def ensure_inputs(paths: list[Path], scale: int) -> dict:
    from throughput import data_bytes

    from astolfo_dist.synthetic import make_state_dict, write_checkpoint

    folder = paths[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    model = data_bytes("sd15", scale)

    def reusable(path: Path, seed: int) -> bool:
        try:
            start, header = read_header(str(path))
            return header.get("__metadata__", {}).get("astolfo_bench") == tag(scale, seed) and (
                path.stat().st_size == start + model
            )
        except (OSError, ValueError, struct.error):
            return False

    todo = [(i, p) for i, p in enumerate(paths) if not reusable(p, i + 1)]
    need = len(todo) * (model + MIB)
    if need > shutil.disk_usage(folder).free:
        raise SystemExit(f"{folder}: needs {need / 1e9:.1f} GB free for the inputs")
    t0 = time.perf_counter()
    for n, (i, path) in enumerate(todo, 1):
        tensors = make_state_dict("sd15", scale=scale, seed=i + 1, float_dtype="F16")
        partial = path.with_name(path.name + ".partial")
        try:
            write_checkpoint(partial, tensors, metadata={"astolfo_bench": tag(scale, i + 1)})
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        del tensors
        gc.collect()
        log(f"generated {path.name} ({n}/{len(todo)})")
    return {"generated": len(todo), "reused": len(paths) - len(todo), "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------- report (parent)


def summarise(runs: list[dict]) -> dict:
    return {
        "gbps_median": round(statistics.median(r["child"]["gbps"] for r in runs), 3),
        "gbps_best_run": round(max(r["child"]["gbps"] for r in runs), 3),
        "gbps_best_pass": round(max(r["child"]["gbps_best_pass"] for r in runs), 3),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "ru_maxrss_mib": max(r["ru_maxrss_mib"] for r in runs),
        "rss_before_loop_mib": max(r["child"]["status_before_mib"]["VmRSS"] for r in runs),
        "rss_anon_end_mib": max(r["child"]["status_end_mib"]["RssAnon"] for r in runs),
        "rss_file_end_mib": max(r["child"]["status_end_mib"]["RssFile"] for r in runs),
    }


def markdown(res: dict) -> str:
    cfg, m = res["config"], res["machine"]
    lines = [
        f"Read modes, {res['date_utc']}: {cfg['models']} x {cfg['model_bytes'] / 1e6:.1f} MB sd15 fp16 "
        f"(scale 1/{cfg['scale']}), warm page cache, {cfg['threads']} threads, chunk {cfg['chunk_elems']} elements "
        f"({cfg['chunk_elems'] * 2 / MIB:g} MiB) per input, reduce = `copy_` to float32 + `add_`, "
        f"{cfg['passes']} passes per run, {cfg['repeats']} runs per mode (alternating). "
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; torch {res['versions']['torch']}, "
        f"Python {res['versions']['python']}, kernel {m['kernel']}.",
        "",
        "| mode | GB/s (median run) | GB/s (best pass) | peak RSS, sampled (MiB) | ru_maxrss (MiB) "
        "| RSS before the loop (MiB) | RssAnon at end (MiB) | RssFile at end (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, s in res["modes"].items():
        lines.append(
            f"| `{mode}` | {s['gbps_median']:.2f} | {s['gbps_best_pass']:.2f} | {s['peak_rss_mib']:.0f} "
            f"| {s['ru_maxrss_mib']:.0f} | {s['rss_before_loop_mib']:.0f} | {s['rss_anon_end_mib']:.0f} "
            f"| {s['rss_file_end_mib']:.0f} |"
        )
    lines += ["", res["verdict"]]
    if res["notes"]:
        lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def verdict(modes: dict[str, dict]) -> str:
    p, a = modes["pread"], modes["mmap+madvise"]
    speed = a["gbps_best_pass"] / p["gbps_best_pass"]
    lower = min(("pread", "mmap+madvise"), key=lambda k: modes[k]["ru_maxrss_mib"])
    same = abs(speed - 1) <= 0.05
    plain = f", {modes['mmap']['ru_maxrss_mib']:.0f} MiB for `mmap`" if "mmap" in modes else ""
    return (
        f"`mmap+madvise` runs at {speed:.2f}x the speed of `pread`, best pass against best pass "
        f"({'equal within 5%' if same else 'not equal'}); "
        f"lower peak RSS (ru_maxrss): `{lower}` ({p['ru_maxrss_mib']:.0f} MiB for `pread`, "
        f"{a['ru_maxrss_mib']:.0f} MiB for `mmap+madvise`{plain})."
    )


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=8, help="number of inputs (default 8)")
    ap.add_argument("--scale", type=int, default=2, help="shrink every dimension by this factor (default 2: ~257 MB)")
    ap.add_argument("--threads", type=int, default=2, help="worker threads (default 2)")
    ap.add_argument("--chunk-elems", type=int, default=512 << 10, help="fp16 elements per input chunk (512 Ki)")
    ap.add_argument("--passes", type=int, default=3, help="passes over all inputs per run (default 3)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per mode, alternating (default 5)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--dir", default="benchmarks/work/read_modes", help="folder for the inputs")
    ap.add_argument("--json", default="benchmarks/results/read_modes.json")
    ap.add_argument("--markdown", default="benchmarks/results/read_modes.md")
    ap.add_argument("--keep", action="store_true", help="keep the inputs for the next run")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    ap.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.files, args.threads, args.chunk_elems, args.passes)))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES) or not {"pread", "mmap+madvise"} <= set(modes):
        ap.error(f"--modes: of {', '.join(MODES)}, with pread and mmap+madvise")
    if min(args.models - 1, args.scale, args.threads, args.chunk_elems, args.passes, args.repeats) < 1:
        ap.error("need --models >= 2 and positive --scale, --threads, --chunk-elems, --passes, --repeats")

    # Imported here, not at the top, so that the measured subprocesses load only torch and psutil.
    import safetensors
    from throughput import machine_info, raw_read, remove_inputs, run_sampled, write_results

    folder = Path(args.dir)
    created_dir = not folder.exists()
    paths = [folder / f"sd15-s{args.scale}-f16-{i + 1:02d}.safetensors" for i in range(args.models)]
    notes: list[str] = []
    try:
        gen = ensure_inputs(paths, args.scale)
        sizes = [p.stat().st_size for p in paths]
        if sum(sizes) > psutil.virtual_memory().available * 0.8:
            notes.append(f"the inputs ({sum(sizes) / 1e9:.1f} GB) do not fit the available memory: partly cold")
        raw_read(paths, 2, 16 * MIB)
        fault_kib = fault_granularity(str(paths[0]))
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            for mode in modes:
                log(f"{mode}, run {rep + 1}/{args.repeats}")
                raw_read(paths, 2, 16 * MIB)  # warm
                load = os.getloadavg()[0]
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--threads", str(args.threads)]
                cmd += ["--chunk-elems", str(args.chunk_elems), "--passes", str(args.passes), "--files"]
                r = run_sampled([*cmd, *map(str, paths)])
                r["child"] = json.loads(r.pop("stdout").splitlines()[-1])
                r["loadavg_1m_before"] = round(load, 2)
                runs[mode].append(r)
        sums = {r["child"]["checksum"] for rs in runs.values() for r in rs}
        if len(sums) != 1 or not all(r["child"]["checksums_agree"] for rs in runs.values() for r in rs):
            notes.append(f"CHECKSUMS DIFFER between runs or modes: {sorted(sums)}")
        summary = {m: summarise(runs[m]) for m in modes}
        notes += [
            "GB/s: input bytes reduced / seconds, timed inside the subprocess after its start-up (interpreter, "
            "torch import, header parsing, opening and mapping the files); 'median run': over all passes of a run, "
            "median of the runs; 'best pass': the fastest single pass of any run, the figure least disturbed by "
            "other load on a shared machine (the speed comparison uses it). `mmap`'s first pass of a run faults its "
            "pages in, its later passes do not",
            "peak RSS, sampled: the subprocess's RSS sampled every ~20 ms (max over runs); ru_maxrss: its high-water "
            "mark from wait4 (max over runs). Both include the interpreter and torch (see 'RSS before the loop')",
            "RssAnon / RssFile: /proc/self/status at the end of the last pass, before unmapping: file-backed pages "
            "mapped into the process count in its RSS although the page cache owns them",
            "`pread` here leaves out the engine's posix_fadvise(WILLNEED) readahead hints: no-ops with a warm cache",
            f"checksum of the accumulators, every run and mode: {sorted(sums)}",
            f"one read fault on a warm mapping of an input maps {', '.join(map(str, fault_kib))} KiB (probed at "
            f"{len(fault_kib)} offsets; a page is {mmap.PAGESIZE // 1024} KiB): `madvise` of exactly a chunk's pages "
            "leaves mapped what such faults brought in beyond its ends, wherever the neighbouring chunk was "
            "already done (by the other thread, across shard boundaries)",
        ]
        res = {
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine_info(folder),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "safetensors": safetensors.__version__,
                "psutil": psutil.__version__,
            },
            "config": {
                "models": args.models,
                "layout": "sd15",
                "dtype": "F16",
                "scale": args.scale,
                "model_bytes": sizes[0],
                "input_bytes": sum(sizes),
                "threads": args.threads,
                "chunk_elems": args.chunk_elems,
                "shards": SHARDS,
                "passes": args.passes,
                "repeats": args.repeats,
                "page_size": mmap.PAGESIZE,
                "mmap_fault_kib": fault_kib,
            },
            "generation": gen,
            "modes": {m: summary[m] for m in modes},
            "runs": runs,
            "notes": notes,
        }
        res["verdict"] = verdict(summary)
    finally:
        if not args.keep:
            remove_inputs(paths, folder, created_dir)

    write_results(res, markdown(res), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
