"""The CLI edge: exit codes, one-line errors naming the file, no traceback, no partial or
clobbered output."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_models, sha256
from safetensors.torch import save_file

from astolfo_dist.cli import main

CLI = [sys.executable, "-m", "astolfo_dist"]


def raw_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def _entry(dtype="F16", shape=(2,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {
    "tiny": lambda p: p.write_bytes(b"\x01\x02") and p,
    "absurd-length": lambda p: raw_file(p, b"{}", length=1 << 40),
    "length-past-end": lambda p: raw_file(p, b"{}", length=4096),
    "not-json": lambda p: raw_file(p, b"{not json"),
    "json-list": lambda p: raw_file(p, b"[1, 2]"),
    "unknown-dtype": lambda p: raw_file(p, {"w": _entry(dtype="F17")}, b"\0" * 4),
    "negative-dim": lambda p: raw_file(p, {"w": _entry(shape=(-2,))}, b"\0" * 4),
    "span-mismatch": lambda p: raw_file(p, {"w": _entry(shape=(3,))}, b"\0" * 4),
    "out-of-bounds": lambda p: raw_file(p, {"w": _entry(offsets=(0, 4))}, b"\0" * 2),
    "overlap": lambda p: raw_file(p, {"w": _entry(), "v": _entry(offsets=(2, 6))}, b"\0" * 6),
    "gap": lambda p: raw_file(p, {"w": _entry(offsets=(2, 6))}, b"\0" * 6),
    "metadata-not-str": lambda p: raw_file(p, {"__metadata__": {"a": 1}, "w": _entry()}, b"\0" * 4),
    "duplicate-key": lambda p: raw_file(p, ('{"w":' + json.dumps(_entry()) + ',"w":' + json.dumps(_entry()) + "}")
                                        .encode(), b"\0" * 4),
    "garbage-ckpt": None,
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("good"), ["F16", "F16"], keys=40)


def _bad_input(tmp_path: Path, case: str) -> Path:
    if case == "garbage-ckpt":
        path = tmp_path / "garbage.ckpt"
        path.write_bytes(os.urandom(256))
        return path
    path = tmp_path / f"{case}.safetensors"
    MALFORMED[case](path)
    return path


def _assert_one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("astolfo-dist: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_exit_2_names_file_and_leaves_no_output(good, tmp_path, capsys, case):
    bad = _bad_input(tmp_path, case)
    out = tmp_path / "out.safetensors"
    code = main(["merge", str(good[0]), str(bad), "-o", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    _assert_one_line_error(capsys.readouterr().err, str(bad))
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("case", ["overlap", "garbage-ckpt"])
def test_existing_output_untouched_on_bad_input_even_with_overwrite(good, tmp_path, capsys, case):
    bad = _bad_input(tmp_path, case)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    code = main(["merge", str(good[0]), str(bad), "-o", str(out), "--overwrite", "--cache-dir", str(tmp_path / "c")])
    assert code == 2
    assert out.read_bytes() == b"precious"
    assert not out.with_name(out.name + ".partial").exists()


def test_existing_output_needs_overwrite(good, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert main(["merge", *map(str, good), "-o", str(out)]) == 2
    _assert_one_line_error(capsys.readouterr().err, str(out), "--overwrite")
    assert out.read_bytes() == b"precious"
    assert main(["merge", *map(str, good), "-o", str(out), "--overwrite", "-q"]) == 0
    assert out.read_bytes() != b"precious"


def test_missing_path_and_empty_folder(good, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["merge", str(good[0]), str(missing), "-o", str(tmp_path / "o.safetensors")]) == 2
    _assert_one_line_error(capsys.readouterr().err, str(missing), "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("not a model")
    assert main(["merge", str(good[0]), str(empty), "-o", str(tmp_path / "o.safetensors")]) == 2
    _assert_one_line_error(capsys.readouterr().err, str(empty), "no checkpoint")
    assert not list(tmp_path.glob("o.safetensors*"))


def test_shape_mismatch_names_both_files_and_the_key(tmp_path, capsys):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    save_file({"x": torch.zeros(2, 3, dtype=torch.float16), "y": torch.zeros(2)}, str(a))
    save_file({"x": torch.zeros(3, 2, dtype=torch.float16), "y": torch.zeros(2)}, str(b))
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "o.safetensors")]) == 2
    _assert_one_line_error(capsys.readouterr().err, str(a), str(b), "'x'", "[2, 3]", "[3, 2]")


def test_strict_keys_names_the_input_and_a_missing_key(tmp_path, capsys):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    save_file({"x": torch.ones(2), "only_a": torch.ones(2)}, str(a))
    save_file({"x": torch.ones(2)}, str(b))
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "o.safetensors")]) == 2
    _assert_one_line_error(capsys.readouterr().err, str(b), "only_a", "--keys")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--weights", "1,2,3"], "3 weights given for 2 models"),
        (["--drop", "("], "not a valid regular expression"),
        (["--replace", "nothing-here"], "PREFIX=MODEL"),
        (["--weights", "1,-1"], "sum to zero"),
        (["--tensor-cache-mb", "-1"], "--tensor-cache-mb must not be negative"),
        (["--device", "cuda:x"], "--device must be cpu or cuda"),
    ],
)
def test_bad_options_exit_2(good, tmp_path, capsys, args, needle):
    assert main(["merge", *map(str, good), "-o", str(tmp_path / "o.safetensors"), *args]) == 2
    _assert_one_line_error(capsys.readouterr().err, needle)


def test_subprocess_errors_have_no_traceback_and_debug_shows_one(good, tmp_path):
    bad = _bad_input(tmp_path, "overlap")
    cmd = [*CLI, "merge", str(good[0]), str(bad), "-o", str(tmp_path / "o.safetensors")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    _assert_one_line_error(proc.stderr, str(bad), "overlaps")
    proc = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_success_prints_the_output_path(good, tmp_path):
    out = tmp_path / "o.safetensors"
    proc = subprocess.run([*CLI, "merge", *map(str, good), "-o", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "merged" in proc.stderr


def test_ctrl_c_removes_the_partial_output(tmp_path):
    inputs = make_models(tmp_path / "in", ["F32"] * 3, scale=4)  # ~270 MB of reads
    out = tmp_path / "o.safetensors"
    partial = out.with_name(out.name + ".partial")
    proc = subprocess.Popen(
        [*CLI, "merge", *map(str, inputs), "-o", str(out), "--workers", "1", "--chunk-mb", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert partial.exists(), "the merge finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not partial.exists() and not out.exists()


def test_inspect_summarises_components(good, capsys):
    assert main(["inspect", str(good[0])]) == 0
    text = capsys.readouterr().out
    assert "tensors:    40" in text and "text encoder (SD1 CLIP-L)" in text


def test_demo_merges_and_prints_the_output(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--models", "3", "--scale", "32", "-q"]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out.exists() and out.parent == tmp_path / "demo"
    assert sha256(out) != sha256(tmp_path / "demo" / "community-01.safetensors")


def test_the_command_freezes_start_up_objects_out_of_the_collector_and_main_alone_does_not():
    """`astolfo-dist` (cli.entry) moves the objects made at start-up out of the cyclic
    collector's reach (gc.freeze) before it runs; a program that calls main() keeps its own
    collector as it was."""
    probe = (
        "import gc, sys\n"
        "from astolfo_dist import cli\n"
        "def run(call):\n"
        "    try:\n"
        "        call()\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0\n"
        "run(lambda: cli.main(['--version']))\n"
        "assert gc.get_freeze_count() == 0\n"
        "sys.argv = ['astolfo-dist', '--version']\n"
        "run(cli.entry)\n"
        "print('frozen', gc.get_freeze_count())\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert int(proc.stdout.split()[-1]) > 100_000, proc.stdout
