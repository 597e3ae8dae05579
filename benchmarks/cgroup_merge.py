"""A full-size merge inside a real cgroup memory limit far below the inputs' size.

Run from the repository root, as root on a machine with a writable cgroup memory controller:

    .venv/bin/python benchmarks/cgroup_merge.py [--models 8] [--scale 1] [--limit 2GiB]
        [--json benchmarks/results/cgroup_merge.json] [--markdown PATH]

Makes (or reuses) N synthetic SD1.5-layout fp16 checkpoints with throughput.py's generator,
then runs `astolfo-dist merge` inside a new child cgroup limited to --limit, cold (page cache
dropped first) and reports wall time, the cgroup's peak usage (page cache included), the
peak RSS of the merge's process tree, and whether the kernel OOM-killed anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (benchmarks share one generator and sampler)

from astolfo_dist.budget import parse_size  # noqa: E402


def memory_cgroup_parent() -> tuple[str, Path]:
    if os.geteuid() != 0:
        raise SystemExit("needs root (to create a cgroup)")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if controllers == "":
            folder = Path("/sys/fs/cgroup") / path.lstrip("/")
            control = folder / "cgroup.subtree_control"
            if control.exists() and "memory" in control.read_text():
                return "v2", folder
        elif "memory" in controllers.split(","):
            return "v1", Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise SystemExit("no writable cgroup memory controller here")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--limit", default="2GiB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="benchmarks/work")
    ap.add_argument("--json", default="benchmarks/results/cgroup_merge.json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    limit = parse_size(args.limit)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = tp.input_paths(folder, args.models, "sd15", args.scale)
    tp.ensure_inputs(paths, "sd15", args.scale)
    inputs = sum(p.stat().st_size for p in paths)
    version, parent = memory_cgroup_parent()
    cgroup = parent / f"astolfo-bench-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    out = folder / "cgroup-merged.safetensors"
    try:
        if version == "v1":
            (cgroup / "memory.limit_in_bytes").write_text(str(limit))
        else:
            (cgroup / "memory.max").write_text(str(limit))
            (cgroup / "memory.swap.max").write_text("0")
        tp.evict("drop", paths)
        cmd = ["/bin/sh", "-c", f'echo $$ > "{cgroup / "cgroup.procs"}" && exec "$@"', "sh",
               *tp.astolfo_cmd(), "merge", *map(str, paths), "-o", str(out), "--overwrite", "-q",
               "--workers", str(args.workers)]
        run = tp.run_sampled(cmd)
        if version == "v1":
            peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
            oom = "oom_kill 0" in (cgroup / "memory.oom_control").read_text()
        else:
            peak_file = cgroup / "memory.peak"
            peak = int(peak_file.read_text()) if peak_file.exists() else -1
            oom = "oom_kill 0" in (cgroup / "memory.events").read_text()
    finally:
        out.unlink(missing_ok=True)
        cgroup.rmdir()
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": tp.machine_info(folder),
        "models": args.models,
        "scale": args.scale,
        "input_gb": round(inputs / 1e9, 3),
        "limit_mib": round(limit / tp.MIB),
        "inputs_over_limit": round(inputs / limit, 1),
        "wall_s": run["seconds"],
        "input_gb_per_s": round(inputs / 1e9 / run["seconds"], 3),
        "cgroup_peak_mib": round(peak / tp.MIB),
        "peak_rss_tree_mib": run["peak_rss_mib"],
        "ru_maxrss_mib": run["ru_maxrss_mib"],
        "oom_killed": not oom,
    }
    table = (
        f"cgroup merge, {result['date']}: {args.models} x SD1.5 fp16 (scale 1/{args.scale}), "
        f"{result['input_gb']} GB in, cgroup {version} limit {result['limit_mib']} MiB "
        f"({result['inputs_over_limit']}x smaller than the inputs), cold cache, --workers {args.workers}.\n\n"
        "| wall s | input GB/s | cgroup peak (MiB, page cache included) | peak RSS, process tree (MiB) | OOM kill |\n"
        "|---:|---:|---:|---:|---|\n"
        f"| {result['wall_s']:.1f} | {result['input_gb_per_s']:.2f} | {result['cgroup_peak_mib']} | "
        f"{result['peak_rss_tree_mib']:.0f} | {'yes' if result['oom_killed'] else 'no'} |\n"
    )
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 1 if result["oom_killed"] else 0


if __name__ == "__main__":
    sys.exit(main())
