#!/usr/bin/env python3
"""attend tune: search the CPU schedule knobs for this machine's target.

For each head dim, a coordinate descent over the generator's schedule
GeneratorParams of one operation (the forward by default, --operation backward
for the backward's kernel), starting from the hand schedule (the generator's
defaults): each candidate is generated for the target through the kernel cache
with the build's generator (tools/kernel_cache.py), checked against the
double-precision reference and timed by build/tools/attend_tune_probe, so a
wrong schedule can never win. The
machine's load drifts, so a line of candidates is timed in one probe run with
the current best, interleaved call by call, and judged against that run's
figures for the best; one over 10 % slower on the small shapes is not timed on
the large ones. At the end the search path is timed again (3 interleaved runs)
and the fastest that is nowhere slower than the hand schedule (within --noise)
wins, so the table never holds a schedule slower than the hand one.

The winners go to tuning/cpu.json (one entry per target, operation and head
dim: d<dim> for the forward, backward_d<dim> for the backward, with the figures
that made them win), which the build reads: retuning and rebuilding is

    ./build.sh tune          # this script, with its defaults
    ./build.sh               # regenerates the kernels with the new parameters

Every measurement is saved as it is made (build/tune/state-<target>.json, or
state-<target>-backward.json): an interrupted run, started again, replays them
and goes on where it stopped (--fresh forgets them).
"""
import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

import kernel_cache

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Operation:
    """What the search tunes: a generator, its knobs and how its calls are counted."""
    name: str
    generator: str          # the registered generator (-g)
    source: pathlib.Path    # where its knobs' defaults (the hand schedule) are
    # The knobs and the values the search tries (the hand schedule's value is
    # always among them: it is the start). vector_width 0 is the target's
    # natural width; twice that runs each vector operation on two registers.
    knob_values: dict
    # A line of the search varies one knob, or both sides of a register tile at
    # once (they share the registers: one alone rarely moves without spilling).
    lines: list
    tiles: tuple            # the register tiles: (vectors knob, columns knob) each
    flops_per_nmd: float    # floating-point operations per b·h·n·m·d (halved for causal)
    entry_prefix: str       # the data file's entry: <prefix><head dim>
    probe_args: tuple       # how attend_tune_probe is told the kernels' operation


FORWARD = Operation(
    name="forward", generator="attention", source=ROOT / "generators" / "attention_generator.cpp",
    knob_values={
        "query_tile": [16, 24, 32, 48, 64, 96, 128],
        "key_block": [32, 48, 64, 96, 128, 192, 256],
        "score_row_vectors": [1, 2, 3, 4, 6],
        "score_cols": [2, 3, 4, 5, 6, 8],
        "pv_row_vectors": [1, 2, 3, 4, 6],
        "pv_cols": [2, 3, 4, 5, 6, 8],
        "vector_width": [0, "double"],
        "v_panels": [False, True],
    },
    lines=["query_tile", "key_block", ("score_row_vectors", "score_cols"), ("pv_row_vectors", "pv_cols"),
           "vector_width", "v_panels"],
    tiles=(("score_row_vectors", "score_cols"), ("pv_row_vectors", "pv_cols")),
    flops_per_nmd=4.0, entry_prefix="d", probe_args=())
# The backward's CPU knobs (its query_tile and key_block are the GPU's dQ pass).
BACKWARD = Operation(
    name="backward", generator="attention_backward",
    source=ROOT / "generators" / "attention_backward_generator.cpp",
    knob_values={
        "key_tile": [16, 24, 32, 48, 64, 96, 128],
        "query_block": [16, 32, 48, 64, 96, 128],
        "tile_vectors": [1, 2, 3, 4, 6],
        "tile_cols": [2, 3, 4, 5, 6, 8],
        "dq_tile_vectors": [1, 2, 3, 4, 6],
        "dq_tile_cols": [2, 3, 4, 5, 6, 8],
        "vector_width": [0, "double"],
    },
    lines=["key_tile", "query_block", ("tile_vectors", "tile_cols"), ("dq_tile_vectors", "dq_tile_cols"),
           "vector_width"],
    tiles=(("tile_vectors", "tile_cols"), ("dq_tile_vectors", "dq_tile_cols")),
    flops_per_nmd=10.0, entry_prefix="backward_d", probe_args=("--backward",))
OPERATIONS = {op.name: op for op in (FORWARD, BACKWARD)}

ABOUT = ("Schedule parameters of the CPU kernels per Halide target, operation and head dim (d<dim>: the "
         "forward, backward_d<dim>: the backward), written by tools/tune.py (./build.sh tune); read by "
         "cmake/AttendKernels.cmake")
MIN_ACCUMULATORS = 8  # a register tile smaller than this cannot hide the FMA latency
DEFAULT_SHAPES = ["2,8,256,256", "2,8,1024,1024", "2,8,1024,1024,causal", "2,8,4096,4096"]
SMALL_N = 1024  # shapes up to this n are timed first and gate the others


def say(message):
    print(message, file=sys.stderr, flush=True)


def hand_schedule(op=FORWARD):
    """The generator's defaults for the knobs: the hand schedule."""
    source = op.source.read_text()
    defaults = {}
    for knob in op.knob_values:
        found = re.search(r'GeneratorParam<(int|bool)>\s+%s\{"%s",\s*(-?\d+|true|false)\}' % (knob, knob), source)
        if not found:
            sys.exit(f"tune: cannot find the default of GeneratorParam {knob} in {op.source}")
        value = found.group(2)
        defaults[knob] = value == "true" if found.group(1) == "bool" else int(value)
    return defaults


def cpu_flags():
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def natural_vector_width(target):
    return 16 if "avx512" in target else 8 if "avx" in target else 4


def generator_params(params, target):
    """The knobs' values for the generator (vector_width "double": twice the natural width)."""
    return {k: natural_vector_width(target) * 2 if v == "double" else v for k, v in params.items()}


def generator_arg(knob, value):
    """knob=value as the generator's command line takes it (a bool as true or false)."""
    return f"{knob}={str(value).lower() if isinstance(value, bool) else value}"


def runs_here(target):
    """Whether this CPU runs a Halide x86 target (the levels attend's runtime knows)."""
    flags = cpu_flags()
    needed = set()
    if "avx512" in target:
        needed |= {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    if "avx2" in target:
        needed |= {"avx2", "fma", "f16c", "sse4_1"}
    return target.startswith("x86-64") and needed <= flags


def cache_value(build, name):
    cache = (build / "CMakeCache.txt").read_text()
    found = re.search(r"^%s:[A-Z]+=(.*)$" % name, cache, re.M)
    return found.group(1) if found else None


class Candidates:
    """Generates, checks and times candidate kernels, remembering every result."""

    def __init__(self, build, target, repeats, state_path, fresh, op=FORWARD):
        self.build, self.target, self.repeats, self.op = build, target, repeats, op
        self.generate_timeout = None  # seconds; None: no limit
        config = build / "generators" / "attend_generator.json"
        self.probe = build / "tools" / "attend_tune_probe"
        for tool in (config, self.probe):
            if not tool.exists():
                sys.exit(f"tune: {tool} is missing: run ./build.sh first")
        self.generator = kernel_cache.Generator(config)
        if not self.generator.executable.exists():
            sys.exit(f"tune: {self.generator.executable} is missing: run ./build.sh first")
        # Candidates are keyed by the generator's contents too: a new generator
        # invalidates every linked candidate and measurement.
        self.generator_hash = hashlib.sha1(self.generator.executable.read_bytes()).hexdigest()[:12]
        self.cache = build / "tune" / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.state_path = state_path
        self.results = {}
        if state_path.exists() and not fresh:
            saved = json.loads(state_path.read_text())
            if saved.get("generator") == self.generator_hash:
                self.results = saved["results"]
                say(f"tune: resuming: {len(self.results)} measurements from {state_path}")
            else:
                say(f"tune: {state_path} is from another generator build: starting over")

    def key(self, head_dim, params, scheduler=None):
        # (The forward's keys leave out its name: they stay those of earlier saved states.)
        scope = [self.target, head_dim, params, scheduler] + ([self.op.name] if self.op != FORWARD else [])
        text = json.dumps(scope, sort_keys=True)
        return hashlib.sha1((self.generator_hash + text).encode()).hexdigest()[:16]

    def library(self, head_dim, params, scheduler=None):
        """Generates the candidate as a shared library (cached); returns (path, function)."""
        key = self.key(head_dim, params, scheduler)
        function = f"candidate_{key}"
        so = self.cache / f"{function}.so"
        if so.exists():
            return so, function
        knobs = [generator_arg(k, v) for k, v in generator_params(params, self.target).items()]
        args = ["-g", self.op.generator, "-o", str(self.cache), "-e", "static_library",
                "-f", function, f"target={self.target}-user_context-no_runtime", f"head_dim={head_dim}",
                "element_type=float32"] + knobs
        if scheduler:
            plugin = halide_plugin(self.build, scheduler)
            args[0:0] = ["-p", str(plugin)]
            args += [f"autoscheduler={scheduler}"]
        try:
            status, printed = self.generator.run(args, capture=True, timeout=self.generate_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"generating {params or scheduler} took over {self.generate_timeout} s: stopped")
        archive = self.cache / f"{function}.a"
        if status != 0:
            why = printed.strip()[-2000:] or f"exit status {status}"
            raise RuntimeError(f"generating {params or scheduler} failed: {why}")
        subprocess.run(["c++", "-shared", "-o", str(so), "-Wl,--whole-archive", str(archive),
                        "-Wl,--no-whole-archive"], check=True)
        archive.unlink()
        return so, function

    def generate_all(self, head_dim, candidates, jobs):
        """Generates the candidates not yet cached, `jobs` at a time."""
        missing = [p for p in candidates if not (self.cache / f"candidate_{self.key(head_dim, p)}.so").exists()]
        if not missing:
            return
        started = time.time()
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(self.library, head_dim, p) for p in missing]
            for done, _ in enumerate(concurrent.futures.as_completed(futures), 1):
                elapsed = time.time() - started
                say(f"    generated {done}/{len(missing)} candidates "
                    f"({elapsed:.0f} s, ~{elapsed / done * (len(missing) - done):.0f} s left)")
        for f in futures:
            try:
                f.result()
            except RuntimeError as error:
                say(f"    {error}")

    def measure(self, head_dim, group, shapes, label=""):
        """Checks and times a group of candidates, (params, autoscheduler or None)
        each, interleaved in one probe run. Returns per candidate its GFLOP/s per
        shape (medians), or None when it fails to build or the reference check.
        Remembered under the group and the shape set (a resumed run replays it)."""
        key = hashlib.sha1(json.dumps([[self.key(head_dim, p, a) for p, a in group], shapes, label]).encode()).hexdigest()
        if key in self.results:
            return self.results[key]
        built = []
        for params, scheduler in group:
            try:
                built.append(self.library(head_dim, params, scheduler))
            except RuntimeError as error:
                say(f"    {error}")
                built.append(None)
        specs = [f"{so}:{function}" for so, function in (b for b in built if b)]
        results = [None] * len(group)
        if specs:
            probe = subprocess.run([str(self.probe), *self.op.probe_args, str(head_dim), str(self.repeats)] + specs +
                                   ["--"] + shapes, capture_output=True, text=True)
            try:
                record = json.loads(probe.stdout)
            except json.JSONDecodeError:
                raise SystemExit(f"tune: {self.probe} failed ({probe.returncode}): {probe.stderr.strip()}")
            if probe.stderr.strip():
                say("    " + probe.stderr.strip().replace("\n", "\n    "))
            at = iter(range(len(specs)))
            for index, b in enumerate(built):
                if not b:
                    continue
                k = next(at)
                if not record["kernels"][k]["ok"]:
                    continue
                gflops = []
                for shape in record["shapes"]:
                    flops = self.op.flops_per_nmd * shape["b"] * shape["h"] * shape["n"] * shape["m"] * shape["d"]
                    flops *= 0.5 if shape["causal"] else 1.0
                    gflops.append(flops / (statistics.median(shape["ms"][k]) * 1e-3) / 1e9)
                results[index] = gflops
        self.remember(key, results)
        return results

    def remember(self, key, value):
        self.results[key] = value
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"generator": self.generator_hash, "target": self.target,
                                   "results": self.results}, indent=0))
        tmp.replace(self.state_path)


def halide_plugin(build, scheduler):
    """The autoscheduler plugin of the Halide package the build uses."""
    halide_dir = pathlib.Path(cache_value(build, "Halide_DIR") or "")  # <prefix>/lib64/cmake/Halide
    plugin = halide_dir.parent.parent / f"libautoschedule_{scheduler.lower()}.so"
    if not plugin.exists():
        raise RuntimeError(f"autoscheduler {scheduler}: no plugin {plugin}")
    return plugin


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def registers_fit(params, target, op=FORWARD):
    """Each register tile's accumulators, row vectors and a broadcast fit the
    target's vector registers (16, or 32 with AVX-512): no spills; and it has
    enough accumulators to keep the FMA units busy."""
    registers = 32 if "avx512" in target else 16
    for rows, cols in op.tiles:
        per_vector = 2 if params["vector_width"] == "double" else 1
        if per_vector * (params[rows] * params[cols] + params[rows]) + 1 > registers:
            return False
        if params[rows] * params[cols] < MIN_ACCUMULATORS:
            return False
    return True


def knobs_of(line):
    """The knobs a line of the search varies."""
    return line if isinstance(line, tuple) else (line,)


def line_options(best, line, target, op=FORWARD):
    """The candidates of one line: best with that knob (or tile) changed."""
    knobs = knobs_of(line)
    values = [()]
    for knob in knobs:
        values = [v + (x,) for v in values for x in op.knob_values[knob]]
    options = [dict(best, **dict(zip(knobs, v))) for v in values]
    return [p for p in options if p != best and registers_fit(p, target, op)]


def line_name(line):
    return "x".join(knobs_of(line))


def show(label, gflops):
    say(f"    {label}: " + (" ".join(f"{g:.1f}" for g in gflops) + f" GFLOP/s (geomean {geomean(gflops):.1f})"
                            if gflops else "failed"))


def tune_head_dim(candidates, head_dim, shapes, budget_s, noise, jobs, plan_sweeps, confirm_rounds=3, knobs=None):
    """Coordinate descent from the hand schedule; returns the entry for the data file.

    Each line of candidates is timed together with the current best in one probe
    run (interleaved), and judged against that run's figures for the best."""
    small = [s for s in shapes if int(s.split(",")[2]) <= SMALL_N]
    large = [s for s in shapes if s not in small]
    op = candidates.op
    hand = hand_schedule(op)
    started = time.time()
    best, path, evaluated = dict(hand), [dict(hand)], 1

    searched = [line for line in op.lines if knobs is None or set(knobs_of(line)) & set(knobs)]
    lines = [(sweep, line) for sweep in range(plan_sweeps) for line in searched]
    improved_in_sweep = False
    for line_index, (sweep, line) in enumerate(lines):
        if line == searched[0]:
            if sweep > 0 and not improved_in_sweep:
                break  # a whole sweep changed nothing: converged
            improved_in_sweep = False
        elapsed = time.time() - started
        if elapsed > budget_s:
            say(f"  d={head_dim}: budget spent after {evaluated} candidates")
            break
        options = line_options(best, line, candidates.target, op)
        say(f"  {op.name} d={head_dim} sweep {sweep + 1}, {line_name(line)} ({line_index + 1}/{len(lines)}): "
            f"{len(options)} candidates; {elapsed / 60:.1f} min so far, at most "
            f"{max(0, budget_s - elapsed) / 60:.1f} min left")
        if not options:
            continue
        candidates.generate_all(head_dim, options, jobs)
        evaluated += len(options)
        label = lambda p: ", ".join(f"{k}={p[k]}" for k in knobs_of(line))  # noqa: E731
        group = [best] + options
        first = candidates.measure(head_dim, [(p, None) for p in group], small)
        if first[0] is None:
            sys.exit(f"tune: the current best {best} failed at d={head_dim}: see above")
        show("current best (small shapes)", first[0])
        survivors = []
        for params, gflops in zip(options, first[1:]):
            if gflops and geomean(gflops) >= 0.9 * geomean(first[0]):
                survivors.append(params)
            elif gflops:
                show(label(params) + " (small shapes, over 10 % below the best: stops here)", gflops)
        if large and survivors:
            rest = candidates.measure(head_dim, [(p, None) for p in [best] + survivors], large)
        else:
            rest = [[]] * (len(survivors) + 1)
        full = lambda i, p: first[group.index(p)] + rest[i]  # noqa: E731
        reference = full(0, best)
        if large:
            show("current best", reference)
        winner, winner_gflops = None, reference
        for i, params in enumerate(survivors, 1):
            if rest[i] is None:
                continue
            gflops = full(i, params)
            show(label(params), gflops)
            if geomean(gflops) > (1 + noise / 2) * geomean(winner_gflops):
                winner, winner_gflops = params, gflops
        if winner:
            best = winner
            path.append(dict(best))
            improved_in_sweep = True
            say(f"    -> {label(best)}")

    # The search compared measurements of different runs along the way; its path
    # (hand schedule first) is timed again, interleaved, in confirm_rounds probe
    # runs, and the fastest that is nowhere slower than the hand schedule (within
    # the noise) wins.
    say(f"  d={head_dim}: confirming: {len(path)} schedules of the search path, {confirm_rounds} rounds")
    rounds = [candidates.measure(head_dim, [(p, None) for p in path], shapes, label=f"confirm {r}")
              for r in range(confirm_rounds)]
    medians = [[statistics.median(r[i][s] for r in rounds) for s in range(len(shapes))] for i in range(len(path))]
    hand_gflops = medians[0]
    eligible = [i for i in range(len(path)) if all(g >= (1 - noise) * h for g, h in zip(medians[i], hand_gflops))]
    chosen = max(eligible, key=lambda i: geomean(medians[i]))
    for i, params in enumerate(path):
        show(("hand schedule" if i == 0 else f"step {i}") + (" (chosen)" if i == chosen else ""), medians[i])
    best, best_gflops = path[chosen], medians[chosen]
    minutes = (time.time() - started) / 60
    return {
        "params": generator_params(best, candidates.target),
        "shapes": shapes,
        "gflops": {"tuned": [round(g, 2) for g in best_gflops], "hand": [round(g, 2) for g in hand_gflops]},
        "hand_params": hand,
        # Each step of the search and its figures in the confirmation rounds.
        "search_path": [{"changed": {k: v for k, v in p.items() if hand[k] != v},
                         "gflops": [round(g, 2) for g in medians[i]]} for i, p in enumerate(path)],
        "candidates_evaluated": evaluated,
        "confirm_rounds": confirm_rounds,
        "minutes": round(minutes, 1),
    }


def fma_peak(build):
    tool = build / "bench" / "fma_peak"
    if not tool.exists():
        return None
    return float(subprocess.run([str(tool)], check=True, capture_output=True, text=True).stdout.split()[-1])


def cpu_model():
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--build", default=str(ROOT / "build"), help="the configured and built tree")
    parser.add_argument("--target", help="Halide target to tune (default: the best of ATTEND_CPU_TARGETS "
                        "this CPU runs)")
    parser.add_argument("--operation", choices=sorted(OPERATIONS), default="forward",
                        help="whose kernel to tune: the forward's (default) or the backward's")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims (default 64,128)")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="b,h,n,m[,causal]",
                        help="the shape set (default: " + " ".join(DEFAULT_SHAPES) + ")")
    parser.add_argument("--knobs", help="comma-separated knobs: search only the lines that vary them "
                        "(default: every knob of the operation)")
    parser.add_argument("--budget-minutes", type=float, default=25.0, help="time for the whole search (default 25)")
    parser.add_argument("--sweeps", type=int, default=2, help="passes over the knobs at most (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per shape, median taken (default 5)")
    parser.add_argument("--noise", type=float, default=0.02,
                        help="relative timing noise: a winner may be this much slower than the hand "
                        "schedule on one shape, and must beat the best by half of it (default 0.02)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="candidates generated at once")
    parser.add_argument("--output", default=str(ROOT / "tuning" / "cpu.json"), help="the data file to update")
    parser.add_argument("--state", help="where measurements are saved for a resume "
                        "(default: BUILD/tune/state-TARGET.json)")
    parser.add_argument("--fresh", action="store_true", help="forget saved measurements")
    args = parser.parse_args()

    build = pathlib.Path(args.build).resolve()
    if not (build / "CMakeCache.txt").exists():
        sys.exit(f"tune: --build: {build} is not a configured build tree: run ./build.sh first")
    if args.target:
        target = args.target
        if not runs_here(target):
            sys.exit(f"tune: --target: this CPU cannot run {target} (the tuner times on this machine)")
    else:
        targets = (cache_value(build, "ATTEND_CPU_TARGETS") or "").split(";")
        target = next((t for t in targets if runs_here(t)), None)
        if not target:
            sys.exit(f"tune: no target of ATTEND_CPU_TARGETS ({targets}) runs on this CPU")
    try:
        head_dims = [int(d) for d in args.head_dims.split(",")]
    except ValueError:
        sys.exit(f"tune: --head-dims: expected comma-separated integers, got '{args.head_dims}'")
    if any(d < 1 for d in head_dims):
        sys.exit(f"tune: --head-dims: expected positive head dims, got '{args.head_dims}'")
    for bad, why in ((args.budget_minutes <= 0, "--budget-minutes must be positive"),
                     (args.repeats < 1, "--repeats must be at least 1"), (args.sweeps < 1, "--sweeps must be at least 1"),
                     (not 0 <= args.noise < 0.5, "--noise must be in [0, 0.5)"), (args.jobs < 1, "--jobs must be at least 1")):
        if bad:
            sys.exit(f"tune: {why}")
    for shape in args.shapes:
        if not re.fullmatch(r"[1-9]\d*,[1-9]\d*,[1-9]\d*,[1-9]\d*(,causal)?", shape):
            sys.exit(f"tune: --shapes: expected b,h,n,m or b,h,n,m,causal with positive sizes, got '{shape}'")

    op = OPERATIONS[args.operation]
    knobs = args.knobs.split(",") if args.knobs else None
    unknown = [k for k in knobs or [] if k not in op.knob_values]
    if unknown:
        sys.exit(f"tune: --knobs: {', '.join(unknown)} not among the {op.name} knobs ({', '.join(op.knob_values)})")
    suffix = "" if op == FORWARD else f"-{op.name}"
    state = pathlib.Path(args.state) if args.state else build / "tune" / f"state-{target}{suffix}.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    candidates = Candidates(build, target, args.repeats, state, args.fresh, op)
    say(f"tune: {op.name}, target {target}, head dims {head_dims}, shapes {' '.join(args.shapes)}, "
        f"budget {args.budget_minutes:g} min")
    started = time.time()
    entries = {}
    for index, head_dim in enumerate(head_dims):
        left = args.budget_minutes * 60 - (time.time() - started)
        entries[f"{op.entry_prefix}{head_dim}"] = tune_head_dim(
            candidates, head_dim, args.shapes, left / (len(head_dims) - index), args.noise, args.jobs, args.sweeps,
            knobs=knobs)
    peak = fma_peak(build)

    output = pathlib.Path(args.output)
    data = json.loads(output.read_text()) if output.exists() else {}
    data["about"] = ABOUT
    for entry in entries.values():
        entry.update({"cpu": cpu_model(), "threads": os.cpu_count(), "fma_peak_gflops": peak,
                      "date": datetime.date.today().isoformat()})
    data.setdefault("targets", {}).setdefault(target, {}).update(entries)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(output)

    print(f"{op.name}, target {target}: {(time.time() - started) / 60:.1f} min; FMA peak {peak} GFLOP/s")
    print(f"{'d':>4} {'shape (b,h,n,m)':>24} {'hand GFLOP/s':>13} {'tuned GFLOP/s':>14} {'tuned/hand':>11}")
    for name, entry in entries.items():
        for shape, hand, tuned in zip(entry["shapes"], entry["gflops"]["hand"], entry["gflops"]["tuned"]):
            print(f"{name[len(op.entry_prefix):]:>4} {shape:>24} {hand:>13.1f} {tuned:>14.1f} {tuned / hand:>11.2f}")
        changed = {k: v for k, v in entry["params"].items() if entry["hand_params"].get(k) != v}
        print(f"     params: {changed or 'the hand schedule'}")
    print(f"written to {output}; rebuild (./build.sh) to use it")


if __name__ == "__main__":
    main()
