#!/usr/bin/env python3
"""Tests of the generated-kernel cache (tools/kernel_cache.py), run by ctest:

    test_kernel_cache.py BUILD_DIR

With a stand-in generator that counts its runs: a second run with the same
arguments does not run it and writes the same files, whatever the output
directory; any other argument, another generator binary, another libHalide or
another HL_* variable runs it again; a failing run stores nothing; an output
that is already there and identical is left untouched (so ninja relinks
nothing); prune keeps the most recently used entries. Then the build's own
generator, through the configuration CMake wrote for it: a kernel generated
into an empty cache, then copied from it, byte for byte.
"""
import json
import os
import pathlib
import stat
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import kernel_cache  # noqa: E402

# A generator stand-in: counts its runs, writes NAME.h and NAME.o into -o (their
# contents name the stand-in), and fails when an argument is "fail".
STAND_IN = """#!/bin/sh
echo run >> "{runs}"
out=""; name=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o) out="$2"; shift 2 ;;
        -n) name="$2"; shift 2 ;;
        fail) echo "stand-in failed" >&2; exit 3 ;;
        *) shift ;;
    esac
done
echo "header {marker}" > "$out/$name.h"
echo "object {marker}" > "$out/$name.o"
"""


def check(condition, message):
    if not condition:
        sys.exit("FAILED: " + message)
    print("ok:", message)


def stand_in(scratch, marker="a"):
    """A stand-in generator and its configuration; returns (config path, runs file)."""
    runs = scratch / f"runs-{marker}"
    runs.write_text("")
    executable = scratch / f"generator-{marker}"
    executable.write_text(STAND_IN.format(runs=runs, marker=marker))
    executable.chmod(stat.S_IRWXU)
    halide = scratch / "libHalide.so"
    if not halide.exists():
        halide.write_text("libHalide")
    config = scratch / f"config-{marker}.json"
    config.write_text(json.dumps({"generator": str(executable), "depends": [str(halide)],
                                  "cache": str(scratch / "cache"), "log": str(scratch / "log")}))
    return config, runs


def runs_of(runs):
    return len(runs.read_text().splitlines())


def stand_in_tests(scratch):
    config, runs = stand_in(scratch)
    generator = kernel_cache.Generator(config)
    out1, out2 = scratch / "out1", scratch / "out2"
    args = lambda out, *extra: ["-n", "k", "-g", "attention", "-o", str(out), "target=host", "head_dim=64", *extra]  # noqa: E731

    status, _ = generator.run(args(out1), capture=True)
    check(status == 0 and runs_of(runs) == 1, "a first run generates")
    first = {p.name: p.read_bytes() for p in out1.iterdir()}
    check(set(first) == {"k.h", "k.o"}, f"and writes its outputs: {sorted(first)}")
    status, _ = generator.run(args(out2), capture=True)
    check(status == 0 and runs_of(runs) == 1, "the same arguments into another directory: no run")
    check({p.name: p.read_bytes() for p in out2.iterdir()} == first, "the same files, byte for byte")

    before = (out1 / "k.o").stat().st_mtime_ns
    time.sleep(0.02)
    generator.run(args(out1), capture=True)
    check((out1 / "k.o").stat().st_mtime_ns == before, "an identical output already there is not rewritten")
    (out1 / "k.o").write_text("stale")
    generator.run(args(out1), capture=True)
    check((out1 / "k.o").read_bytes() == first["k.o"], "a different one is replaced")

    generator.run(args(out1, "key_block=128"), capture=True)
    check(runs_of(runs) == 2, "another parameter: a run")
    os.environ["HL_DEBUG_CODEGEN"] = "1"
    generator.run(args(out1), capture=True)
    del os.environ["HL_DEBUG_CODEGEN"]
    check(runs_of(runs) == 3, "another HL_* variable: a run")
    halide = pathlib.Path(json.loads(config.read_text())["depends"][0])
    halide.write_text("libHalide, reinstalled")
    generator.run(args(out1), capture=True)
    check(runs_of(runs) == 4, "another libHalide: a run")

    other_config, other_runs = stand_in(scratch, marker="b")
    kernel_cache.Generator(other_config).run(args(out1), capture=True)
    check(runs_of(other_runs) == 1 and (out1 / "k.h").read_text() == "header b\n",
          "another generator binary: a run, its own outputs")

    time.sleep(0.02)
    generator.run(args(out1), capture=True)
    check(runs_of(runs) == 4, "the first generator again, as it last ran: no run")

    entries = len(list((scratch / "cache" / "entries").glob("*/*")))
    status, printed = generator.run(args(out1, "fail"), capture=True)
    check(status == 3 and "stand-in failed" in printed, f"a failing run returns its status and output ({status})")
    check(len(list((scratch / "cache" / "entries").glob("*/*"))) == entries, "and stores nothing")
    check(not list((scratch / "cache" / "scratch").iterdir()), "nor leaves its scratch directory")

    log = (scratch / "log").read_text().split("\n")
    check(sum(line.startswith("cached k ") for line in log) == 4 and sum(line.startswith("generated k ") for line in log) == 5,
          f"the log has each run's outcome: {log}")
    summary = kernel_cache.summary(scratch / "log")
    check("5 generated" in summary and "4 from the kernel cache" in summary, summary)

    # prune keeps the most recently used: the entry the last good run copied, though
    # the other generator's was stored after it.
    used = max((scratch / "cache" / "entries").glob("*/*"), key=lambda e: e.stat().st_mtime)
    check(json.loads((used / "manifest.json").read_text())["generator"].endswith("generator-a"),
          "a copy marks its entry as used")
    size = sum(f.stat().st_size for f in used.iterdir())
    kept, _, removed = kernel_cache.prune(scratch / "cache", size / 2**20)
    check((kept, removed) == (entries, 0), f"prune spares entries used in the last hour ({kept} kept)")
    kept, _, removed = kernel_cache.prune(scratch / "cache", size / 2**20, spare_seconds=0)
    check((kept, removed) == (1, entries - 1) and used.exists(),
          f"prune to one entry's size keeps that one ({kept} kept, {removed} removed)")

    # An entry left incomplete (a prune interrupted while removing it) is made again.
    (used / "k.o").unlink()
    out3 = scratch / "out3"
    status, _ = generator.run(args(out3), capture=True)
    check(status == 0 and runs_of(runs) == 6 and (out3 / "k.o").read_bytes() == first["k.o"],
          f"an incomplete entry: a run, and its outputs (status {status}, {runs_of(runs)} runs)")
    check(kernel_cache.Generator._stored_outputs(used) is not None, "the entry is whole again")


def real_generator_test(build, scratch):
    config = json.loads((build / "generators" / "attend_generator.json").read_text())
    config.update(cache=str(scratch / "real-cache"), log=str(scratch / "real-log"))
    (scratch / "real.json").write_text(json.dumps(config))
    generator = kernel_cache.Generator(scratch / "real.json")
    args = lambda out: ["-g", "attention", "-f", "cached_kernel", "-e", "static_library,c_header", "-o", str(out),  # noqa: E731
                        "target=x86-64-linux-user_context-no_runtime", "head_dim=0"]
    started = time.time()
    status, printed = generator.run(args(scratch / "real1"), capture=True)
    generated = time.time() - started
    check(status == 0, f"the build's generator runs through the cache: {printed}")
    started = time.time()
    status, _ = generator.run(args(scratch / "real2"), capture=True)
    copied = time.time() - started
    check(status == 0 and "cached cached_kernel" in (scratch / "real-log").read_text(),
          f"the same kernel again comes from the cache ({generated:.2f} s generated, {copied:.2f} s copied)")
    for name in ("cached_kernel.a", "cached_kernel.h"):
        check((scratch / "real1" / name).read_bytes() == (scratch / "real2" / name).read_bytes(), f"{name} byte for byte")


def main():
    build = pathlib.Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        stand_in_tests(pathlib.Path(scratch))
        real_generator_test(build, pathlib.Path(scratch))


if __name__ == "__main__":
    main()
