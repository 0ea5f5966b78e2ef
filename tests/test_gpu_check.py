#!/usr/bin/env python3
"""bench/gpu_check.sh runs once per GPU session, with no second chance: this test
runs its CUDA flow here, against the fake CUDA driver (tests/fake_cuda, launches
that do nothing) and stand-ins for compute-sanitizer and ncu that run the
command they wrap, so that a broken step, a kernel name that no longer exists or
a comparison that fails shows up in CI rather than on the GPU. What the kernels
compute is not checked here (the launches do nothing): the CUDA tests' step is
expected to fail, and only its presence is asserted.

    test_gpu_check.py BUILD_DIR FAKE_CUDA_DIR
"""
import json
import os
import pathlib
import re
import stat
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 3  # the comparison's: far too short for all of it, so it must stop and say so

# compute-sanitizer --tool T --error-exitcode N COMMAND...: runs COMMAND.
SANITIZER = """#!/bin/sh
while [ $# -gt 0 ] && [ "$1" != "--error-exitcode" ]; do shift; done
shift 2
exec "$@"
"""
# ncu OPTIONS... COMMAND...: runs COMMAND, the first argument that is a program file.
NCU = """#!/bin/sh
while [ $# -gt 0 ] && ! { [ -f "$1" ] && [ -x "$1" ]; }; do shift; done
exec "$@"
"""


def check(condition, message):
    if not condition:
        sys.exit("FAILED: " + message)
    print("ok:", message)


def main():
    build, fake_driver = pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2]).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        tools, out = scratch / "tools", scratch / "out"
        tools.mkdir()
        for name, text in (("compute-sanitizer", SANITIZER), ("ncu", NCU)):
            (tools / name).write_text(text)
            (tools / name).chmod(stat.S_IRWXU)
        env = dict(os.environ, PATH=f"{tools}:{os.environ['PATH']}", OUT=str(out), COMPARE_TIME_LIMIT_S=str(TIME_LIMIT_S),
                   ATTEND_FAKE_CUDA="launch=noop",
                   LD_LIBRARY_PATH=f"{fake_driver}:{os.environ.get('LD_LIBRARY_PATH', '')}")
        run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(build)], env=env,
                             capture_output=True, text=True, timeout=600)
        summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
        print(summary)
        check(run.returncode in (0, 1), f"the script ends by itself (exit {run.returncode}): {run.stderr[-500:]}")

        headers = re.findall(r"^==> (\d)\.", summary, re.M)
        check(headers == ["1", "2", "3", "4", "5", "6"], f"steps 1 to 6 in order: {headers}")
        check(re.search(r"^==> done: \d+ failed step", summary, re.M) is not None, "the summary ends with its count")
        status = dict(re.findall(r"^(\S+): exit (\d+) in \d+ s$", summary, re.M))
        check("tests" in status and "fault" in status, "the CUDA tests and the fault test ran")
        check("python" in status, "the Python package's tests ran (their outcome depends on this python3's packages)")
        check(status.get("registers") == "0", f"the driver's registers per kernel function: exit 0 (got {status.get('registers')})")
        check("functions with local memory (spills): 0" in summary, "the summary counts the functions that spill")
        sanitized = [name for name in status if name.startswith(("racecheck_", "memcheck_"))]
        profiles = [name for name in status if name.startswith("profile_")]
        check(len(sanitized) == 9, f"9 sanitizer runs: {sanitized}")
        check(len(profiles) == 3, f"3 profiles: {profiles}")
        # Every other step's command worked: its kernels exist and its arguments parse.
        for name in sanitized + ["memory_bound", "compare", "overhead"] + profiles:
            check(status.get(name) == "0", f"{name}: exit 0 (got {status.get(name)})")

        check(f"not run: --time-limit {TIME_LIMIT_S} s was reached" in summary,
              "the comparison stopped at its time limit, saying so")
        entries = [json.loads(line) for line in (out / "compare_gpu.jsonl").read_text().splitlines()]
        check(len(entries) >= 1, f"the comparison wrote {len(entries)} shape(s) before its limit")
        timed = [r for e in entries for r in e["attend"].values()]
        check(timed and all("median_ms" in r and r["device"] == "cuda" and r["calls_per_sample"] >= 1 for r in timed),
              f"each of its {len(timed)} measurement(s) timed a CUDA kernel")


if __name__ == "__main__":
    main()
