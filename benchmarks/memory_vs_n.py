"""Peak memory of `astolfo-dist merge` against the number of inputs N, on small synthetic checkpoints.

Run from the repository root:

    .venv/bin/python benchmarks/memory_vs_n.py [--ns 2,4,8,16,32] [--scale 4] [--workers 2] [--repeats 2]
        [--dir benchmarks/work/memory_vs_n] [--json benchmarks/results/memory_vs_n.json]
        [--png benchmarks/results/memory_vs_n.png] [--markdown PATH] [--keep]

1. Makes max(N) fp16 checkpoints with the SD1.5 layout (`astolfo_dist.synthetic.make_state_dict`,
   every dimension shrunk by --scale: ~64 MB each at --scale 4) in --dir, once, reusing files an
   earlier --keep run left there. Each run merges the first N of them.
2. For every N, with the same settings (uniform average, --workers, the engine's default chunk and
   shard size; `--memory` too if this engine's `merge --help` lists it): warms the page cache with
   the N inputs, then runs `astolfo-dist merge` in a subprocess through throughput.py's launcher
   (so this process's memory does not leak into the child's ru_maxrss) and samples the summed RSS
   of its process tree every ~20 ms. The runs are interleaved over N, --repeats times.
3. Prints a markdown table, writes everything to --json and a chart of peak RSS against N with a
   +-10% band around N = 2 to --png; judges whether the peak is flat in N (every N within +-10% of
   N = 2, on both the sampled peak and ru_maxrss).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from throughput import (
    MIB,
    astolfo_cmd,
    data_bytes,
    holds,
    machine_info,
    raw_read,
    remove_inputs,
    run_sampled,
    versions,
    write_results,
)

from astolfo_dist.synthetic import LAYOUTS, make_state_dict, write_checkpoint

GEN_VERSION = "1"  # bump when the generator's output changes, so old files are not reused
BAND = 0.10  # flat = every N within +-10% of the N = 2 peak


def log(msg: str) -> None:
    print(f"[memory_vs_n] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs


def tag(layout: str, scale: int, seed: int) -> str:
    return json.dumps(
        {"gen": f"make_state_dict/{GEN_VERSION}", "layout": layout, "scale": scale, "seed": seed, "dtype": "F16"},
        sort_keys=True,
    )


def is_reusable(path: Path, layout: str, scale: int, seed: int) -> bool:
    return holds(path, tag(layout, scale, seed), data_bytes(layout, scale))


def ensure_inputs(paths: list[Path], layout: str, scale: int) -> dict:
    folder = paths[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(i, p) for i, p in enumerate(paths) if not is_reusable(p, layout, scale, i + 1)]
    model = data_bytes(layout, scale)
    need = len(todo) * (model + (1 << 20)) + model  # + the merge output
    free = shutil.disk_usage(folder).free
    if need > free:
        raise SystemExit(
            f"{folder}: needs {need / 1e9:.1f} GB free for the inputs and the output, has {free / 1e9:.1f}"
        )
    started = time.perf_counter()
    for n, (i, path) in enumerate(todo, 1):
        tensors = make_state_dict(layout, scale=scale, seed=i + 1, float_dtype="F16")
        partial = path.with_name(path.name + ".partial")
        try:
            write_checkpoint(partial, tensors, metadata={"astolfo_bench": tag(layout, scale, i + 1)})
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        del tensors
        gc.collect()
        if n % 8 == 0 or n == len(todo):
            log(f"generated {n}/{len(todo)} inputs")
    seconds = round(time.perf_counter() - started, 3)
    return {"generated": len(todo), "reused": len(paths) - len(todo), "seconds": seconds}


# ----------------------------------------------------------------------------- measurements


def merge_supports(option: str) -> bool:
    """Whether `astolfo-dist merge --help` lists `option`, as installed now."""
    proc = subprocess.run([*astolfo_cmd(), "merge", "--help"], capture_output=True, text=True)
    return proc.returncode == 0 and re.search(rf"(^|\s){re.escape(option)}\b", proc.stdout) is not None


def engine_source() -> dict:
    """The commit the engine was run from and whether astolfo_dist/ had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "astolfo_dist"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"error": str(exc)}
    return {"commit": commit, "astolfo_dist_uncommitted_changes": bool(dirty)}


def summarise(runs: list[dict], input_bytes: int) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    return {
        "input_gb": round(input_bytes / 1e9, 4),
        "seconds": round(seconds, 4),
        "gbps": round(input_bytes / seconds / 1e9, 3),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "ru_maxrss_mib": max(r["ru_maxrss_mib"] for r in runs),
    }


def flatness(by_n: dict[int, dict], startup_mib: float) -> dict:
    ns = sorted(by_n)
    lo, hi = ns[0], ns[-1]
    out: dict = {"band": BAND, "reference_n": lo, "largest_n": hi}
    for metric in ("peak_rss_mib", "ru_maxrss_mib"):
        ref = by_n[lo][metric]
        ratios = {n: round(by_n[n][metric] / ref, 4) for n in ns}
        out[metric] = {
            "reference": ref,
            "ratio_largest_to_reference": ratios[hi],
            "ratios": ratios,
            "all_within_band": all(abs(r - 1) <= BAND for r in ratios.values()),
        }
    # The interpreter and torch are most of the peak; the engine's own part can grow a lot and
    # still stay inside the band, so show it on its own.
    above = {n: round(by_n[n]["ru_maxrss_mib"] - startup_mib, 1) for n in ns}
    out["ru_maxrss_above_startup_mib"] = above
    out["flat"] = out["peak_rss_mib"]["all_within_band"] and out["ru_maxrss_mib"]["all_within_band"]
    return out


# ----------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    cfg, m, fl = res["config"], res["machine"], res["flatness"]
    ref = fl["reference_n"]
    mem = cfg["memory_option"]
    mem_text = f"`--memory {mem['value']}`" if mem["passed"] else "no `--memory` (not offered by this engine)"
    lines = [
        f"Memory vs N, {res['date_utc']}: uniform merge of N {cfg['layout']} fp16 checkpoints of "
        f"{cfg['model_bytes'] / 1e6:.1f} MB (scale 1/{cfg['scale']}), --workers {cfg['workers']}, default chunk and "
        f"shard size, {mem_text}, warm page cache, {cfg['repeats']} run(s) per N. "
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; torch {res['versions']['torch']}, "
        f"Python {res['versions']['python']}.",
        "",
        f"| N | input GB | wall s (median) | GB/s | peak RSS, sampled (MiB) | ru_maxrss (MiB) "
        f"| ru_maxrss vs N={ref} | ru_maxrss above startup (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n_text, r in res["by_n"].items():
        n = int(n_text)
        lines.append(
            f"| {n} | {r['input_gb']:.3f} | {r['seconds']:.2f} | {r['gbps']:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {r['ru_maxrss_mib']:.0f} | {fl['ru_maxrss_mib']['ratios'][n]:.3f} "
            f"| {fl['ru_maxrss_above_startup_mib'][n]:.0f} |"
        )
    st = res["startup"]
    lines.append(
        f"| startup only (`astolfo-dist --version`) | | {st['seconds']:.2f} | | {st['peak_rss_mib']:.0f} "
        f"| {st['ru_maxrss_mib']:.0f} | | |"
    )
    hi = fl["largest_n"]
    word = "PASS" if fl["flat"] else "FAIL"
    lines += [
        "",
        f"Flat within +-{BAND:.0%} of N={ref} (every N, sampled peak and ru_maxrss): **{word}**. "
        f"N={hi} / N={ref}: sampled {fl['peak_rss_mib']['ratio_largest_to_reference']:.3f}, "
        f"ru_maxrss {fl['ru_maxrss_mib']['ratio_largest_to_reference']:.3f}.",
    ]
    if res["notes"]:
        lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in res["by_n"]]
    sampled = [res["by_n"][str(n)]["peak_rss_mib"] for n in ns]
    maxrss = [res["by_n"][str(n)]["ru_maxrss_mib"] for n in ns]
    ref = maxrss[0]
    cfg = res["config"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.axhspan(ref * (1 - BAND), ref * (1 + BAND), color="tab:green", alpha=0.15, label=f"N={ns[0]} ru_maxrss ±10%")
    ax.plot(ns, maxrss, "o-", color="tab:blue", label="ru_maxrss of the merge process")
    ax.plot(ns, sampled, "s--", color="tab:orange", label="peak RSS of the process tree (sampled ~20 ms)")
    ax.axhline(res["startup"]["ru_maxrss_mib"], color="grey", ls=":", label="startup only (interpreter + torch)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_ylim(0, max(max(sampled), max(maxrss), ref * (1 + BAND)) * 1.25)
    ax.set_xlabel("N (input checkpoints)")
    ax.set_ylabel("peak RSS (MiB)")
    mem = f", --memory {cfg['memory_option']['value']}" if cfg["memory_option"]["passed"] else ""
    ax.set_title(
        f"astolfo-dist merge: peak RSS vs N ({cfg['layout']} fp16, {cfg['model_bytes'] / 1e6:.0f} MB each, "
        f"--workers {cfg['workers']}{mem})",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="2,4,8,16,32", help="numbers of inputs, comma-separated (default 2,4,8,16,32)")
    ap.add_argument("--scale", type=int, default=4, help="shrink every dimension by this factor (default 4: ~64 MB)")
    ap.add_argument("--layout", choices=LAYOUTS, default="sd15")
    ap.add_argument("--workers", type=int, default=2, help="astolfo-dist merge --workers (default 2)")
    ap.add_argument("--chunk-mb", type=float, help="astolfo-dist merge --chunk-mb (default: the engine's)")
    ap.add_argument(
        "--memory",
        default="400MB",
        help="astolfo-dist merge --memory, passed only if `merge --help` lists it (default 400MB; 'none': never)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="runs per N, interleaved over N (default 2)")
    ap.add_argument("--dir", default="benchmarks/work/memory_vs_n", help="folder for the inputs and the output")
    ap.add_argument("--json", default="benchmarks/results/memory_vs_n.json", help="where to write the results")
    ap.add_argument("--png", default="benchmarks/results/memory_vs_n.png", help="where to write the chart")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table to PATH")
    ap.add_argument("--keep", action="store_true", help="keep the input checkpoints for the next run")
    args = ap.parse_args(argv)
    try:
        ns = sorted({int(x) for x in args.ns.split(",") if x.strip()})
    except ValueError:
        ap.error("--ns: comma-separated integers")
    if len(ns) < 2 or ns[0] < 2 or args.scale < 1 or args.workers < 1 or args.repeats < 1:
        ap.error("need at least two --ns values >= 2 and positive --scale, --workers, --repeats")

    folder = Path(args.dir)
    created_dir = not folder.exists()
    output = folder / "merged.safetensors"
    paths = [folder / f"{args.layout}-s{args.scale}-f16-{i + 1:02d}.safetensors" for i in range(ns[-1])]
    notes: list[str] = []

    memory_supported = args.memory.lower() != "none" and merge_supports("--memory")
    memory_option = {"value": args.memory, "supported": memory_supported, "passed": memory_supported}
    if args.memory.lower() != "none" and not memory_supported:
        notes.append(f"`astolfo-dist merge --help` lists no --memory option: ran without `--memory {args.memory}`")
    extra = ["--workers", str(args.workers)]
    if args.chunk_mb is not None:
        extra += ["--chunk-mb", f"{args.chunk_mb:g}"]
    if memory_supported:
        extra += ["--memory", args.memory]

    try:
        gen = ensure_inputs(paths, args.layout, args.scale)
        sizes = [p.stat().st_size for p in paths]
        avail = psutil.virtual_memory().available
        if sum(sizes) + sizes[0] > avail * 0.9:
            notes.append(f"the inputs ({sum(sizes) / 1e9:.1f} GB) do not fit the available memory: runs partly cold")

        startup = min((run_sampled([*astolfo_cmd(), "--version"]) for _ in range(3)), key=lambda r: r["seconds"])
        startup.pop("stdout")

        runs: dict[int, list[dict]] = {n: [] for n in ns}
        for rep in range(args.repeats):
            for n in ns:
                log(f"N={n}, run {rep + 1}/{args.repeats}")
                raw_read(paths[:n], 2, 16 * MIB)  # warm: every run starts with its inputs in the page cache
                cmd = [*astolfo_cmd(), "merge", *map(str, paths[:n]), "-o", str(output), "--overwrite", "-q", *extra]
                r = run_sampled(cmd)
                r.pop("stdout")
                r["output_bytes"] = output.stat().st_size
                output.unlink()
                runs[n].append(r)
        by_n = {n: summarise(runs[n], sum(sizes[:n])) for n in ns}
        fl = flatness(by_n, startup["ru_maxrss_mib"])
        notes.append(
            "peak RSS, sampled: the RSS of the merge process and its children, summed, sampled every ~20 ms "
            "(max over the runs); ru_maxrss: the merge process's own high-water mark from wait4 (max over the runs); "
            "wall s: the whole process, interpreter and torch import included (median over the runs)"
        )
        notes.append(
            "'above startup': ru_maxrss minus that of `astolfo-dist --version` (interpreter + torch), i.e. what "
            "the merge itself adds"
        )
        res = {
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine_info(folder),
            "versions": versions(),
            "config": {
                "ns": ns,
                "layout": args.layout,
                "dtype": "F16",
                "scale": args.scale,
                "model_bytes": sizes[0],
                "workers": args.workers,
                "chunk_mb": args.chunk_mb,
                "memory_option": memory_option,
                "repeats": args.repeats,
                "dir": str(folder),
                "command": [*astolfo_cmd(), "merge", "MODEL...", "-o", "OUT", "--overwrite", "-q", *extra],
            },
            "engine_source": engine_source(),
            "generation": gen,
            "startup": startup,
            "by_n": {str(n): by_n[n] for n in ns},
            "runs": {str(n): runs[n] for n in ns},
            "flatness": fl,
            "notes": notes,
        }
    finally:
        for p in [output, output.with_name(output.name + ".partial")]:
            p.unlink(missing_ok=True)
        if not args.keep:
            remove_inputs(paths, folder, created_dir)

    write_results(res, markdown(res), args.json, args.markdown)
    chart(res, Path(args.png))
    log(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
