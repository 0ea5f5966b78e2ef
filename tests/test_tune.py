#!/usr/bin/env python3
"""Tests of `attend tune` (tools/tune.py) and its probe, run by ctest:

    test_tune.py BUILD_DIR MUTANT.so probe      the probe rejects a wrong kernel, forward and
                                                backward (and generates the hand schedules at
                                                d=32 to run beside them)
    test_tune.py BUILD_DIR MUTANT.so search     a short search, then its resume; a short
                                                search of the backward's knobs
    test_tune.py BUILD_DIR MUTANT.so build      the build uses tuning/cpu.json
"""
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def check(condition, message):
    if not condition:
        sys.exit("FAILED: " + message)
    print("ok:", message)


def probe(build, mutant):
    """The probe rejects a kernel that writes zeros, still times the good one next
    to it, and names each bad argument."""
    tool = build / "tools" / "attend_tune_probe"
    sys.path.insert(0, str(ROOT / "tools"))
    import tune
    target = next(t for t in tune.cache_value(build, "ATTEND_CPU_TARGETS").split(";") if tune.runs_here(t))
    candidates = tune.Candidates(build, target, 1, pathlib.Path(tempfile.mkdtemp()) / "state.json", fresh=True)
    so, function = candidates.library(32, tune.hand_schedule())
    result = subprocess.run([str(tool), "32", "1", f"{mutant}:mutant", f"{so}:{function}", "--", "1,1,64,64"],
                            capture_output=True, text=True)
    check(result.returncode == 1, f"the probe exits 1 when a kernel writes zeros (got {result.returncode})")
    check("mutant is wrong: max error" in result.stderr, f"and says which and why: {result.stderr.strip()}")
    record = json.loads(result.stdout)
    check([k["ok"] for k in record["kernels"]] == [False, True], f"the mutant fails the check, the hand schedule passes")
    ms = record["shapes"][0]["ms"]
    check(ms[0] == [] and len(ms[1]) >= 1, f"only the good kernel is timed: {ms}")
    for args, message in ((["32", "1", f"{so}:{function}", "--", "1,1,0,64"], "SHAPE: expected b,h,n,m"),
                          (["32", "0", f"{so}:{function}", "--", "1,1,64,64"], "REPEATS: expected at least 1"),
                          (["0", "1", f"{so}:{function}", "--", "1,1,64,64"], "HEAD_DIM: expected a positive head dim"),
                          (["32", "1", f"{so}:no_such_function", "--", "1,1,64,64"], "FUNCTION"),
                          (["32", "1", f"{so}", "--", "1,1,64,64"], "no ':'")):
        result = subprocess.run([str(tool)] + args, capture_output=True, text=True)
        check(result.returncode == 1 and message in result.stderr, f"bad {args[:3]}: {result.stderr.strip()}")
    result = subprocess.run([str(tool), "32", "1", "--", "1,1,64,64"], capture_output=True, text=True)
    check(result.returncode == 2 and "usage" in result.stderr, "no kernel: usage, exit 2")

    # The backward: its mutant rejected, its hand schedule checked and timed.
    backward = tune.Candidates(build, target, 1, pathlib.Path(tempfile.mkdtemp()) / "state.json", fresh=True,
                               op=tune.BACKWARD)
    so, function = backward.library(32, tune.hand_schedule(tune.BACKWARD))
    result = subprocess.run([str(tool), "--backward", "32", "1", f"{mutant}:mutant_backward", f"{so}:{function}",
                             "--", "1,1,64,64,causal"], capture_output=True, text=True)
    check(result.returncode == 1 and "mutant_backward is wrong: max error" in result.stderr,
          f"--backward: the probe exits 1 when a backward kernel writes zeros, saying which: {result.stderr.strip()}")
    record = json.loads(result.stdout)
    check([k["ok"] for k in record["kernels"]] == [False, True],
          "the backward mutant fails the check, the backward hand schedule passes")
    ms = record["shapes"][0]["ms"]
    check(ms[0] == [] and len(ms[1]) >= 1, f"only the good backward kernel is timed: {ms}")


def search(build):
    with tempfile.TemporaryDirectory() as scratch:
        output = pathlib.Path(scratch) / "cpu.json"
        command = [sys.executable, str(ROOT / "tools" / "tune.py"), "--build", str(build), "--head-dims", "32",
                   "--shapes", "1,2,64,64", "1,2,96,200,causal", "--budget-minutes", "0.6", "--sweeps", "1",
                   "--repeats", "3", "--output", str(output),
                   "--state", str(pathlib.Path(scratch) / "state.json")]
        first = subprocess.run(command + ["--fresh"], capture_output=True, text=True)
        print(first.stderr[-3000:])
        check(first.returncode == 0, f"a short search finishes ({first.returncode})")
        data = json.loads(output.read_text())
        (target, entries), = data["targets"].items()
        entry = entries["d32"]
        check(set(entry["params"]) == {"query_tile", "key_block", "vector_width", "score_row_vectors", "score_cols",
                                       "pv_row_vectors", "pv_cols", "v_panels"}, f"the entry has every knob: {entry['params']}")
        check(isinstance(entry["params"]["v_panels"], bool), f"v_panels is a JSON boolean: {entry['params']}")
        check(entry["candidates_evaluated"] >= 2, f"it tried candidates beyond the hand schedule: {entry}")
        path = entry["search_path"]
        check(path[0]["changed"] == {} and all(len(step["gflops"]) == 2 for step in path),
              f"the entry shows the search path from the hand schedule with its figures: {path}")
        noise = 0.02
        check(all(t >= (1 - noise) * h for t, h in zip(entry["gflops"]["tuned"], entry["gflops"]["hand"])),
              f"the winner is not slower than the hand schedule on any shape: {entry['gflops']}")
        check(re.search(r"candidates\b", first.stderr) and "min left" in first.stderr, "it shows progress")
        # Resumed: the saved measurements replay (the same moves, nothing timed
        # again), then the search goes on with a budget of its own.
        second = subprocess.run(command, capture_output=True, text=True)
        check(second.returncode == 0, "the same search again finishes")
        check("resuming:" in second.stderr, "and resumes from the saved measurements")
        moves = [re.findall(r"^    -> .*$", run.stderr, re.M) for run in (first, second)]
        check(moves[1][:len(moves[0])] == moves[0], f"replaying the first run's moves first: {moves}")
        bad = subprocess.run(command[:2] + ["--build", str(build), "--head-dims", "x"], capture_output=True, text=True)
        check(bad.returncode != 0 and "--head-dims" in bad.stderr, f"bad --head-dims: {bad.stderr.strip()}")
        bad = subprocess.run(command[:2] + ["--build", str(build), "--operation", "backward", "--knobs", "query_tile"],
                             capture_output=True, text=True)
        check(bad.returncode != 0 and "--knobs: query_tile not among the backward knobs" in bad.stderr,
              f"a knob of another operation: {bad.stderr.strip()}")

        # The backward's knobs, one line (key tiles): an entry of its own beside
        # the forward's, in the same file.
        backward = [sys.executable, str(ROOT / "tools" / "tune.py"), "--build", str(build), "--operation", "backward",
                    "--head-dims", "32", "--knobs", "key_tile", "--shapes", "1,2,64,64", "1,2,96,200,causal",
                    "--budget-minutes", "0.3", "--sweeps", "1", "--repeats", "3", "--output", str(output),
                    "--state", str(pathlib.Path(scratch) / "backward-state.json"), "--fresh"]
        run = subprocess.run(backward, capture_output=True, text=True)
        print(run.stderr[-3000:])
        check(run.returncode == 0, f"a short backward search finishes ({run.returncode})")
        if "avx2" in target or "avx512" in target:  # 8 or 16 lanes: 16 keys are less than 3 vectors of them
            check("key_tile (16) is smaller than one register tile of keys" in run.stderr,
                  "a key tile narrower than its register tile is refused when generated, and the search goes on")
        data = json.loads(output.read_text())
        entries = data["targets"][target]
        check(set(entries) == {"d32", "backward_d32"}, f"the backward entry joins the forward's: {sorted(entries)}")
        entry = entries["backward_d32"]
        check(set(entry["params"]) == {"key_tile", "query_block", "tile_vectors", "tile_cols", "dq_tile_vectors",
                                       "dq_tile_cols", "vector_width"}, f"the entry has every backward knob: {entry}")
        check(entry["candidates_evaluated"] >= 2, f"it tried key tiles beyond the hand schedule's: {entry}")
        check(all(set(step["changed"]) <= {"key_tile"} for step in entry["search_path"]),
              f"--knobs key_tile: only key_tile moved: {entry['search_path']}")
        check(all(t >= (1 - noise) * h for t, h in zip(entry["gflops"]["tuned"], entry["gflops"]["hand"])),
              f"the backward winner is not slower than its hand schedule on any shape: {entry['gflops']}")


def build_uses_table(build):
    """Each entry of tuning/cpu.json for a target of this build (forward and
    backward) reaches the generator command of that kernel library."""
    cache = (build / "CMakeCache.txt").read_text()
    tuning_file = re.search(r"^ATTEND_TUNING_FILE:FILEPATH=(.*)$", cache, re.M).group(1)
    targets = re.search(r"^ATTEND_CPU_TARGETS:STRING=(.*)$", cache, re.M).group(1).split(";")
    head_dims = re.search(r"^ATTEND_HEAD_DIMS:STRING=(.*)$", cache, re.M).group(1).split(";")
    if not tuning_file:
        print("ATTEND_TUNING_FILE is empty: the hand schedule everywhere, nothing to check")
        return
    data = json.loads(pathlib.Path(tuning_file).read_text())
    ninja = (build / "build.ninja").read_text()
    checked = 0
    for target, entries in data.get("targets", {}).items():
        if target not in targets:
            continue
        isa = "avx512" if "avx512" in target else "avx2" if "avx2" in target else "baseline"
        for shape_class, entry in entries.items():  # d<dim> (forward) or backward_d<dim>
            if shape_class.rsplit("_d", 1)[-1].lstrip("d") not in head_dims:
                continue  # a tree built with fewer head dims (the TSan tree)
            library = f"attend_cpu_{shape_class}_{isa}"
            commands = [line for line in ninja.splitlines() if "attend_generator" in line and f"-f {library} " in line]
            check(commands, f"the build generates {library}")
            for knob, value in entry["params"].items():
                arg = f"{knob}={str(value).lower() if isinstance(value, bool) else value}"  # JSON true: true
                check(f" {arg} " in commands[0] + " ", f"{library} is generated with {arg}")
            checked += 1
    print(f"{checked} tuned entries checked against the build")


def main():
    build, mutant, which = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
    {"probe": lambda: probe(build, mutant), "search": lambda: search(build),
     "build": lambda: build_uses_table(build)}[which]()


if __name__ == "__main__":
    main()
