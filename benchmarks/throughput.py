"""Merge throughput and memory against the raw-read floor, on synthetic checkpoints.

Run from the repository root:

    .venv/bin/python benchmarks/throughput.py [--models 8] [--scale 1] [--workers 2]
        [--dir benchmarks/work] [--json benchmarks/results/throughput.json] [--markdown PATH] [--keep]

1. Makes N synthetic fp16 checkpoints with a real layout (SD1.5 by default; ~2.13 GB each at
   --scale 1) in --dir, written by the safetensors library one model at a time, reusing files
   an earlier run left there. Tensors are windows of one small random pool per dtype, at
   offsets drawn from the model's seed, so the models differ without drawing 1G random numbers
   each.
2. On the same files measures: the raw-read floor (every input read once, sequentially, in
   large reads, by a few threads) cold (page cache dropped) and warm; then an `astolfo-dist
   merge` of all N, warm and cold, in a subprocess whose RSS (with its children's) is sampled
   every ~20 ms; the child's ru_maxrss is kept as a cross-check.
3. Prints a markdown table, writes it with --markdown, and writes everything to --json with
   pass/fail against the targets: warm merge >= 4 GB/s, cold merge <= 1.5x the cold floor,
   peak RSS <= 512 MiB.

Dropping the page cache needs root and a writable /proc/sys/vm/drop_caches; where that fails
the cold measurements are recorded as null with the reason (or use --cold fadvise, which
evicts only the input files with posix_fadvise and needs no privileges).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import astolfo_dist
from astolfo_dist.errors import AstolfoError
from astolfo_dist.formats.dtypes import DTYPES
from astolfo_dist.formats.header import read_header
from astolfo_dist.formats.readers import open_reader
from astolfo_dist.synthetic import LAYOUTS, load_layout, scaled_shape

GEN_VERSION = "1"  # bump when the generator's output changes, so old files are not reused
POOL_ELEMS = 3_000_017  # ~6 MB of fp16: a prime length so windows never line up
SAMPLE_S = 0.02
MIB = 1 << 20

TARGETS = {
    "warm_gbps_min": 4.0,
    "cold_ratio_max": 1.5,
    "peak_rss_mib_max": 512.0,
}


# ----------------------------------------------------------------------------- inputs


def data_bytes(layout: str, scale: int) -> int:
    return sum(math.prod(scaled_shape(shape, scale)) * DTYPES[dt].bits // 8 for _k, shape, dt in load_layout(layout))


def tag(layout: str, scale: int, seed: int) -> str:
    return json.dumps({"layout": layout, "scale": scale, "seed": seed, "gen": GEN_VERSION}, sort_keys=True)


def holds(path: Path, tag_value: str, data_len: int) -> bool:
    """A complete file an earlier run made with the same parameters: the engine's strict header
    reader checks it (offsets tile the data exactly), then the generator's tag and data size."""
    try:
        reader = open_reader(str(path))
    except AstolfoError:
        return False
    try:
        header = read_header(reader)
    except AstolfoError:
        return False
    finally:
        reader.close()
    return header.metadata.get("astolfo_bench") == tag_value and header.file_size - header.data_start == data_len


def is_reusable(path: Path, layout: str, scale: int, seed: int) -> bool:
    return holds(path, tag(layout, scale, seed), data_bytes(layout, scale))


class Pools:
    """One random pool per float dtype, doubled so any window of <= POOL_ELEMS is contiguous."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(12345)
        base = torch.randn(POOL_ELEMS, generator=gen) * 0.5
        self._base = base
        self._pools: dict[torch.dtype, torch.Tensor] = {}

    def get(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._pools:
            p = self._base.to(dtype)
            self._pools[dtype] = torch.cat([p, p])
        return self._pools[dtype]


def make_model(layout: str, scale: int, seed: int, pools: Pools) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape, dtname in load_layout(layout):
        shape = scaled_shape(shape, scale)
        info = DTYPES[dtname]
        if info.torch_dtype is None:
            raise SystemExit(f"{key}: dtype {dtname} has no torch dtype; the generator cannot make it")
        t = torch.empty(shape, dtype=info.torch_dtype)  # its own storage: save_file rejects shared ones
        flat = t.view(-1)
        if info.kind == "float":
            pool = pools.get(info.torch_dtype)
            pos = 0
            while pos < flat.numel():
                m = min(flat.numel() - pos, POOL_ELEMS)
                off = rng.randrange(POOL_ELEMS)
                flat[pos : pos + m].copy_(pool[off : off + m])
                pos += m
        else:  # integer buffers (position_ids): arange, like the real ones and make_state_dict
            flat.copy_(torch.arange(flat.numel(), dtype=info.torch_dtype))
        out[key] = t
    return out


def input_paths(folder: Path, models: int, layout: str, scale: int) -> list[Path]:
    return [folder / f"{layout}-s{scale}-{i + 1:02d}.safetensors" for i in range(models)]


def ensure_inputs(paths: list[Path], layout: str, scale: int) -> dict:
    folder = paths[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(i, p) for i, p in enumerate(paths) if not is_reusable(p, layout, scale, i + 1)]
    need = len(todo) * (data_bytes(layout, scale) + (1 << 20)) + data_bytes(layout, scale)  # + the merge output
    free = shutil.disk_usage(folder).free
    if need > free:
        raise SystemExit(
            f"{folder}: needs {need / 1e9:.1f} GB free for the inputs and the output, has {free / 1e9:.1f}"
        )
    started = time.perf_counter()
    pools = Pools() if todo else None
    for n, (i, path) in enumerate(todo, 1):
        t0 = time.perf_counter()
        tensors = make_model(layout, scale, i + 1, pools)
        partial = path.with_name(path.name + ".partial")
        try:
            save_file(tensors, str(partial), metadata={"astolfo_bench": tag(layout, scale, i + 1)})
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        del tensors
        gc.collect()
        log(f"generated {path.name} ({n}/{len(todo)}) in {time.perf_counter() - t0:.1f} s")
    return {
        "generated": len(todo),
        "reused": len(paths) - len(todo),
        "seconds": round(time.perf_counter() - started, 3),
    }


# ----------------------------------------------------------------------------- measurements


def log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def evict(method: str, paths: list[Path]) -> str | None:
    """Make the next reads of `paths` cold. Returns None on success, else why not."""
    os.sync()
    if method == "skip":
        return "skipped (--cold skip)"
    if method == "fadvise":
        if not hasattr(os, "posix_fadvise"):
            return "posix_fadvise is not available on this platform"
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return None
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        who = "" if os.geteuid() == 0 else " (not root)"
        return f"cannot drop the page cache{who}: {exc.strerror or exc}"
    return None


def raw_read(paths: list[Path], threads: int, block: int) -> dict:
    """Every file once, sequentially, `block`-byte reads into a reused buffer; one file per thread at a time."""
    local = threading.local()

    def read_one(path: Path) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(block))
        total = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
        return total

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(read_one, paths))
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 4), "bytes": total, "gbps": round(total / seconds / 1e9, 3)}


# Runs the measured command as its child and reports its wall time and ru_maxrss. A child's
# ru_maxrss starts at the high-water RSS of the process image that exec replaced, so if this
# (large: torch, the generator's tensors) process spawned the command itself, its own RSS would
# leak into the number; this small launcher, started with -I -S, forks from a few MiB instead.
LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
seconds = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(f"{seconds} {ru.ru_maxrss}")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_sampled(cmd: list[str]) -> dict:
    """Run `cmd` (cmd[0] an absolute path): its wall time, the peak of the summed RSS of it and
    its descendants (sampled every SAMPLE_S), and its ru_maxrss (from wait4, as a cross-check)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage"
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *cmd], stdout=out, stderr=err
            )
        launcher = psutil.Process(proc.pid)
        stop = threading.Event()
        peak = [0, 0]  # bytes, samples

        def sample() -> None:
            while not stop.is_set():
                try:
                    tree = launcher.children(recursive=True)  # the command and its children, not the launcher
                except psutil.Error:
                    tree = []
                total = 0
                for p in tree:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
                peak[1] += 1
                stop.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            proc.wait()
        except BaseException:
            for p in [*launcher.children(recursive=True), launcher]:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            proc.wait()
            raise
        finally:
            stop.set()
            sampler.join()
        stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
        if proc.returncode != 0 or not report.exists():
            raise SystemExit(f"{' '.join(cmd[:2])} ... exited {proc.returncode}:\n{stderr.strip()}")
        seconds, maxrss_kb = report.read_text().split()
    return {
        "seconds": round(float(seconds), 4),
        "peak_rss_mib": round(peak[0] / MIB, 1),
        "ru_maxrss_mib": round(int(maxrss_kb) * 1024 / MIB, 1),  # Linux: kilobytes
        "rss_samples": peak[1],
        "stdout": stdout.strip(),
    }


def astolfo_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "astolfo-dist"  # not resolved: the venv's python is a symlink
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "astolfo_dist"]


def run_merge(paths: list[Path], output: Path, workers: int, input_bytes: int, startup_s: float | None) -> dict:
    cmd = [*astolfo_cmd(), "merge", *map(str, paths), "-o", str(output), "--overwrite", "-q", "--workers", str(workers)]
    r = run_sampled(cmd)
    r.pop("stdout")
    r["output_bytes"] = output.stat().st_size
    r["gbps"] = round(input_bytes / r["seconds"] / 1e9, 3)
    if startup_s is not None and r["seconds"] > startup_s:
        r["gbps_excl_startup"] = round(input_bytes / (r["seconds"] - startup_s) / 1e9, 3)
    return r


def spot_check(paths: list[Path], output: Path, count: int = 4) -> dict:
    """A few small tensors of the output against a uniform average computed here, the
    engine's way (fp32: add in input order, divide once, round to the output dtype)."""
    with safe_open(str(output), framework="pt") as out:
        keys = sorted(out.keys())
        small = [k for k in keys if out.get_slice(k).get_dtype() in ("F16", "BF16", "F32")]
        small = [k for k in small if math.prod(out.get_slice(k).get_shape()) <= (1 << 20)]
        picked = [small[i * len(small) // count] for i in range(count)] if len(small) >= count else small
        bad = []
        for key in picked:
            acc = None
            for p in paths:
                with safe_open(str(p), framework="pt") as f:
                    x = f.get_tensor(key).to(torch.float32)
                acc = x if acc is None else acc + x
            want = (acc / len(paths)).to(out.get_tensor(key).dtype)
            if not torch.equal(want, out.get_tensor(key)):
                bad.append(key)
    return {"keys": picked, "ok": not bad, "mismatched": bad}


# ----------------------------------------------------------------------------- machine


def machine_info(folder: Path) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    disk: dict = {}
    try:
        text = subprocess.run(
            ["df", "-PT", "--block-size=1", str(folder)], capture_output=True, text=True, check=True
        ).stdout
        fields = text.splitlines()[1].split()
        disk = {
            "filesystem": fields[0],
            "type": fields[1],
            "size_gb": round(int(fields[2]) / 1e9, 1),
            "avail_gb": round(int(fields[4]) / 1e9, 1),
            "mount": fields[6],
        }
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError) as exc:
        disk = {"error": str(exc)}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "ram_available_gb": round(psutil.virtual_memory().available / 1e9, 1),
        "kernel": platform.release(),
        "disk": disk,
        "euid": os.geteuid(),
    }


# ----------------------------------------------------------------------------- report


def verdicts(res: dict) -> dict:
    warm = res["merge"]["warm"]
    cold = res["merge"]["cold"]
    peak = max(m["peak_rss_mib"] for m in (warm, cold) if m)
    ratio = cold.get("ratio_to_floor") if cold else None
    return {
        "warm_gbps": {
            "value": warm["gbps"],
            "target": f">= {TARGETS['warm_gbps_min']}",
            "pass": warm["gbps"] >= TARGETS["warm_gbps_min"],
        },
        "cold_ratio": {
            "value": ratio,
            "target": f"<= {TARGETS['cold_ratio_max']}",
            "pass": None if ratio is None else ratio <= TARGETS["cold_ratio_max"],
        },
        "peak_rss_mib": {
            "value": peak,
            "target": f"<= {TARGETS['peak_rss_mib_max']:g}",
            "pass": peak <= TARGETS["peak_rss_mib_max"],
        },
    }


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    cfg, m = res["config"], res["machine"]
    rr, mg, st = res["raw_read"], res["merge"], res["startup"]
    disk = m["disk"]
    lines = [
        f"Throughput, {res['date_utc']}: {cfg['models']} x {cfg['model_bytes'] / 1e9:.3f} GB {cfg['layout']} fp16 "
        f"(scale 1/{cfg['scale']}), {cfg['input_bytes'] / 1e9:.3f} GB in, --workers {cfg['workers']}. "
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, "
        f"{disk.get('type', '?')} on {disk.get('filesystem', '?')}; "
        f"torch {res['versions']['torch']}, Python {res['versions']['python']}.",
        "",
        "| run | seconds | GB/s (input) | GB/s excl. startup | peak RSS, sampled (MiB) | ru_maxrss (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    threads = cfg["read_threads"]
    for name, r in (
        (f"raw read, cold ({threads} threads)", rr["cold"]),
        (f"raw read, warm ({threads} threads)", rr["warm"]),
    ):
        cells = ["n/a", "n/a"] if r is None else [f"{r['seconds']:.3f}", _f(r["gbps"], ".3g")]
        lines.append(f"| {name} | {' | '.join(cells)} | | | |")
    for name, r in (("`astolfo-dist merge`, warm", mg["warm"]), ("`astolfo-dist merge`, cold", mg["cold"])):
        if r is None:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | n/a |")
        else:
            cells = [f"{r['seconds']:.3f}", _f(r["gbps"], ".3g"), _f(r.get("gbps_excl_startup"), ".3g")]
            cells += [f"{r['peak_rss_mib']:.0f}", f"{r['ru_maxrss_mib']:.0f}"]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    for name, r in (("startup only (`astolfo-dist --version`), warm", st["warm"]), ("startup only, cold", st["cold"])):
        if r is not None:
            lines.append(f"| {name} | {r['seconds']:.3f} | | | {r['peak_rss_mib']:.0f} | {r['ru_maxrss_mib']:.0f} |")
    if rr["cold"] is None:
        lines += ["", f"Cold runs not measured: {rr['cold_reason']}"]
    v = res["verdicts"]
    word = {True: "PASS", False: "FAIL", None: "n/a"}
    cold = mg["cold"] or {}
    lines += [
        "",
        "| target | measured | excl. startup (info) | goal | result |",
        "|---|---:|---:|---:|---|",
        f"| warm merge throughput (GB/s) | {_f(v['warm_gbps']['value'], '.3g')} "
        f"| {_f(mg['warm'].get('gbps_excl_startup'), '.3g')} | {v['warm_gbps']['target']} "
        f"| {word[v['warm_gbps']['pass']]} |",
        f"| cold merge time / cold raw-read time | {_f(v['cold_ratio']['value'])} "
        f"| {_f(cold.get('ratio_to_floor_excl_startup'))} | {v['cold_ratio']['target']} "
        f"| {word[v['cold_ratio']['pass']]} |",
        f"| peak RSS, merge process tree (MiB) | {_f(v['peak_rss_mib']['value'], '.0f')} | "
        f"| {v['peak_rss_mib']['target']} | {word[v['peak_rss_mib']['pass']]} |",
    ]
    notes = list(res["notes"])
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "psutil": psutil.__version__,
        "astolfo_dist": astolfo_dist.__version__,
    }


def remove_inputs(paths: list[Path], folder: Path, created_dir: bool) -> None:
    """Delete generated inputs (and their folder if this run made it): the disk is shared."""
    for p in paths:
        p.unlink(missing_ok=True)
    if created_dir:
        try:
            folder.rmdir()
        except OSError:
            pass


def write_results(res: dict, table: str, json_path: str, markdown_path: str | None) -> None:
    """Print the table; write the JSON and, if asked, the markdown."""
    print(table)
    for path, text in ((json_path, json.dumps(res, indent=2) + "\n"), (markdown_path, table)):
        if path:
            out = Path(path)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            log(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=8, help="number of input checkpoints (default 8)")
    ap.add_argument("--scale", type=int, default=1, help="shrink every dimension by this factor (1 = full size)")
    ap.add_argument("--layout", choices=LAYOUTS, default="sd15")
    ap.add_argument("--workers", type=int, default=2, help="astolfo-dist merge --workers (default 2)")
    ap.add_argument("--read-threads", type=int, default=2, help="threads of the raw-read floor (default 2)")
    ap.add_argument("--read-mb", type=int, default=16, help="read size of the raw-read floor in MiB (default 16)")
    ap.add_argument("--dir", default="benchmarks/work", help="folder for the inputs and the merge output")
    ap.add_argument("--json", default="benchmarks/results/throughput.json", help="where to write the results")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table to PATH")
    ap.add_argument(
        "--cold",
        choices=("drop", "fadvise", "skip"),
        default="drop",
        help="how to make the cold runs cold: drop = echo 3 > /proc/sys/vm/drop_caches (root; the default), "
        "fadvise = POSIX_FADV_DONTNEED on the inputs only (no root; the code stays cached), skip",
    )
    ap.add_argument("--keep", action="store_true", help="keep the input checkpoints for the next run")
    args = ap.parse_args(argv)
    if args.models < 2 or args.scale < 1 or args.workers < 1 or args.read_threads < 1 or args.read_mb < 1:
        ap.error("need --models >= 2 and positive --scale, --workers, --read-threads, --read-mb")

    folder = Path(args.dir)
    created_dir = not folder.exists()
    output = folder / "merged.safetensors"
    paths = input_paths(folder, args.models, args.layout, args.scale)
    notes: list[str] = []
    try:
        gen = ensure_inputs(paths, args.layout, args.scale)
        sizes = [p.stat().st_size for p in paths]
        input_bytes = sum(sizes)
        avail = psutil.virtual_memory().available
        if input_bytes + sizes[0] > avail * 0.9:
            notes.append(
                f"inputs + output ({(input_bytes + sizes[0]) / 1e9:.1f} GB) do not fit the available memory "
                f"({avail / 1e9:.1f} GB): the 'warm' runs are partly cold"
            )
        if args.scale > 1:
            notes.append(f"--scale {args.scale}: a small run; the GB/s targets are meant for --scale 1 (full size)")
        block = args.read_mb * MIB

        log("raw read, cold")
        cold_reason = evict(args.cold, paths)
        raw_cold = raw_read(paths, args.read_threads, block) if cold_reason is None else None
        log("raw read, warm")
        raw_warm = raw_read(paths, args.read_threads, block)

        # Interpreter + torch import alone, to tell the fixed cost from the per-byte one.
        # Best of 3: the machine may be shared, and this is subtracted from the merge times.
        startup_warm = min((run_sampled([*astolfo_cmd(), "--version"]) for _ in range(3)), key=lambda r: r["seconds"])
        startup_warm.pop("stdout")

        log("merge, warm")
        raw_read(paths, args.read_threads, block)  # re-warm what the startup run may have pushed out
        merge_warm = run_merge(paths, output, args.workers, input_bytes, startup_warm["seconds"])
        merge_warm["spot_check"] = spot_check(paths, output)
        if not merge_warm["spot_check"]["ok"]:
            notes.append(f"spot check FAILED: {merge_warm['spot_check']['mismatched']} differ from the average")
        output.unlink()

        startup_cold = merge_cold = None
        if cold_reason is None:
            log("startup, cold")
            evict(args.cold, paths)
            startup_cold = run_sampled([*astolfo_cmd(), "--version"])
            startup_cold.pop("stdout")
            log("merge, cold")
            evict(args.cold, paths)
            merge_cold = run_merge(paths, output, args.workers, input_bytes, startup_cold["seconds"])
            output.unlink()
            merge_cold["ratio_to_floor"] = round(merge_cold["seconds"] / raw_cold["seconds"], 3)
            if "gbps_excl_startup" in merge_cold:
                merge_cold["ratio_to_floor_excl_startup"] = round(
                    (merge_cold["seconds"] - startup_cold["seconds"]) / raw_cold["seconds"], 3
                )
        if args.cold == "fadvise":
            notes.append("cold = POSIX_FADV_DONTNEED on the inputs only: Python and torch stayed in the page cache")
        notes.append(
            "merge times are wall times of the whole `astolfo-dist merge` process, interpreter and torch import "
            "included, and the targets are judged on them; 'excl. startup' subtracts the time of "
            "`astolfo-dist --version` (best of 3 warm; one run after dropping the cache for cold)"
        )
        notes.append(
            "peak RSS: the RSS of the merge process and its children, summed, sampled every ~20 ms; "
            "ru_maxrss: the merge process's own high-water mark from wait4"
        )

        res = {
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine_info(folder),
            "versions": versions(),
            "config": {
                "models": args.models,
                "layout": args.layout,
                "dtype": "F16",
                "scale": args.scale,
                "model_bytes": sizes[0],
                "input_bytes": input_bytes,
                "workers": args.workers,
                "read_threads": args.read_threads,
                "read_block_mib": args.read_mb,
                "cold_method": args.cold,
                "dir": str(folder),
                "command": astolfo_cmd() + ["merge", "...", "-o", "OUT", "--overwrite", "-q", "--workers", "W"],
            },
            "generation": gen,
            "raw_read": {"cold": raw_cold, "cold_reason": cold_reason, "warm": raw_warm},
            "startup": {"warm": startup_warm, "cold": startup_cold},
            "merge": {"warm": merge_warm, "cold": merge_cold},
            "targets": TARGETS,
            "notes": notes,
        }
        res["verdicts"] = verdicts(res)
    finally:
        for p in [output, output.with_name(output.name + ".partial")]:
            p.unlink(missing_ok=True)
        if not args.keep:
            remove_inputs(paths, folder, created_dir)

    write_results(res, markdown(res), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
