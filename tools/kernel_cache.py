#!/usr/bin/env python3
"""The generated-kernel cache: a Halide generator run is done once per checkout.

What a generator writes is a function of its executable, the libHalide it loads,
the autoscheduler plugins it is given, the HL_* environment and its arguments
(generator, function name, target, params), not of the directory it writes to.
A run through the cache looks that key up in the cache directory: on a hit the
stored outputs are copied to the run's -o directory and the generator does not
run; on a miss it runs into a scratch directory, and what it wrote is stored
under the key, then copied out. So a rebuilt but identical generator, a fresh
build tree or another tree of the same checkout (the sanitizer and fuzz trees
of ./build.sh) regenerates nothing.

Every kernel of the build (not its Halide runtime, which Halide's own helper makes)
and every candidate of the tuner is generated this way:
CMake writes the generator's configuration, BUILD/generators/attend_generator.json,
and a script that add_halide_library runs in place of the generator,
BUILD/generators/attend_generator_cached; tools/tune.py reads the same file.

    kernel_cache.py run CONFIG GENERATOR_ARGS...   generate through the cache
    kernel_cache.py prune DIR MAX_MIB              drop the least recently used entries past MAX_MIB
                                                   (none used in the last hour)
    kernel_cache.py summary LOG                    what a build's runs did, in one line
"""
import filecmp
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

FORMAT = b"attend kernel cache 1\0"  # change it when what goes into a key changes


def file_digest(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).digest()


def file_identity(path):
    """A large library (libHalide, a plugin) by its path, size and modification time:
    reinstalling it changes the key; hashing its hundreds of MiB on every run would not pay."""
    stat = os.stat(path)
    return f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()


def output_dir_of(args):
    """The value of -o, and the arguments without it."""
    for at, arg in enumerate(args):
        if arg == "-o" and at + 1 < len(args):
            return args[at + 1], args[:at] + args[at + 2:]
    raise SystemExit(f"kernel_cache: the generator arguments have no '-o DIR': {' '.join(args)}")


def name_of(args):
    for flag in ("-n", "-f"):
        if flag in args and args.index(flag) + 1 < len(args):
            return args[args.index(flag) + 1]
    return "?"


class Generator:
    """A generator executable as a build tree configured it (its JSON file)."""

    def __init__(self, config):
        settings = json.loads(pathlib.Path(config).read_text())
        self.executable = pathlib.Path(settings["generator"])
        self.depends = [pathlib.Path(p) for p in settings.get("depends", [])]
        self.cache = pathlib.Path(settings["cache"]) if settings.get("cache") else None
        self.log = pathlib.Path(settings["log"]) if settings.get("log") else None

    def key(self, args):
        """The cache key of a run: everything that determines its outputs."""
        _, args = output_dir_of(args)
        digest = hashlib.sha256(FORMAT)
        digest.update(file_digest(self.executable))
        plugins = []
        for at, arg in enumerate(args[:-1]):
            if arg == "-p":
                plugins += args[at + 1].split(",")
        for path in self.depends + plugins:
            digest.update(file_identity(path) + b"\0")
        for name in sorted(n for n in os.environ if n.startswith("HL_")):
            digest.update(f"{name}={os.environ[name]}\0".encode())
        for arg in args:
            digest.update(arg.encode() + b"\0")
        return digest.hexdigest()

    def run(self, args, capture=False, timeout=None):
        """Runs the generator with these arguments through the cache. Returns its exit
        status (0 for a hit) and, with capture, what it printed (None otherwise:
        it goes to this process's stdout and stderr). timeout: seconds for the
        generator, after which subprocess.TimeoutExpired is raised."""
        out_dir, _ = output_dir_of(args)
        started = time.time()
        if not self.cache:
            return self._generate(args, capture, timeout)
        key = self.key(args)
        entry = self.cache / "entries" / key[:2] / key
        outputs = self._stored_outputs(entry)
        printed = "" if capture else None
        if outputs is None:
            scratch = self.cache / "scratch"
            scratch.mkdir(parents=True, exist_ok=True)
            fresh = pathlib.Path(tempfile.mkdtemp(prefix=key[:16] + "-", dir=scratch))
            at = args.index("-o") + 1
            try:
                status, printed = self._generate(args[:at] + [str(fresh)] + args[at + 1:], capture, timeout)
            except BaseException:  # a timeout, an interrupt: nothing is stored
                shutil.rmtree(fresh, ignore_errors=True)
                raise
            if status != 0:
                shutil.rmtree(fresh, ignore_errors=True)
                return status, printed
            outputs = sorted(p.name for p in fresh.iterdir())
            (fresh / "manifest.json").write_text(json.dumps({
                "outputs": outputs, "generator": str(self.executable), "args": args,
                "seconds": round(time.time() - started, 2), "made": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
            entry.parent.mkdir(parents=True, exist_ok=True)
            if entry.exists() and self._stored_outputs(entry) is None:
                shutil.rmtree(entry, ignore_errors=True)  # a broken entry (an interrupted prune)
            try:
                os.rename(fresh, entry)
            except OSError:  # another process stored the same key first: the same outputs
                if self._stored_outputs(entry) is None:
                    entry = fresh  # whatever it is, serve this run from its own outputs
                else:
                    shutil.rmtree(fresh, ignore_errors=True)
            how = "generated"
        else:
            os.utime(entry)  # recently used, for prune
            how = "cached"
        os.makedirs(out_dir, exist_ok=True)
        for name in outputs:
            destination = os.path.join(out_dir, name)
            # An identical output is left as it is: ninja (restat) then relinks nothing.
            # Otherwise a copy, not a link: it must be newer than the generator for ninja.
            if not (os.path.exists(destination) and filecmp.cmp(entry / name, destination, shallow=False)):
                shutil.copyfile(entry / name, destination + ".tmp")
                os.replace(destination + ".tmp", destination)
        if entry.parent.name == "scratch":
            shutil.rmtree(entry, ignore_errors=True)
        if self.log:
            with open(self.log, "a") as log:  # one short line per write: appends from parallel runs do not mix
                log.write(f"{how} {name_of(args)} {time.time() - started:.2f}\n")
        return 0, printed

    def _generate(self, args, capture, timeout):
        done = subprocess.run([str(self.executable)] + args, capture_output=capture, text=True, timeout=timeout)
        return done.returncode, (done.stdout + done.stderr if capture else None)

    @staticmethod
    def _stored_outputs(entry):
        """The outputs of a complete entry, or None."""
        try:
            outputs = json.loads((entry / "manifest.json").read_text())["outputs"]
        except (OSError, ValueError, KeyError):
            return None
        return outputs if all((entry / name).is_file() for name in outputs) else None


def prune(cache, max_mib, spare_seconds=3600):
    """Removes the least recently used entries until the cache holds at most max_mib
    MiB, and scratch directories left by interrupted runs. Nothing used or made in
    the last spare_seconds is touched: another build may be reading or writing it."""
    recent = time.time() - spare_seconds
    entries = []
    for entry in (pathlib.Path(cache) / "entries").glob("*/*"):
        size = sum(f.stat().st_size for f in entry.iterdir())
        entries.append((entry.stat().st_mtime, size, entry))
    total = sum(size for _, size, _ in entries)
    removed = 0
    for used, size, entry in sorted(entries):
        if total <= max_mib * 2**20 or used > recent:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed += 1
    for scratch in (pathlib.Path(cache) / "scratch").glob("*"):
        if scratch.stat().st_mtime < recent:
            shutil.rmtree(scratch, ignore_errors=True)
    return len(entries) - removed, total, removed


def summary(log):
    """One line on what a build's generator runs did."""
    lines = [line.split() for line in pathlib.Path(log).read_text().splitlines()] if pathlib.Path(log).exists() else []
    lines = [line for line in lines if len(line) == 3]
    generated = [float(seconds) for how, _, seconds in lines if how == "generated"]
    cached = sum(1 for how, _, _ in lines if how == "cached")
    if not lines:
        return "kernels: none generated or copied (nothing to do)"
    return (f"kernels: {len(generated)} generated ({sum(generated):.0f} s of generator time), "
            f"{cached} from the kernel cache")


def main(argv):
    if len(argv) >= 2 and argv[0] == "run":
        return Generator(argv[1]).run(argv[2:])[0]
    if len(argv) == 3 and argv[0] == "prune":
        if not pathlib.Path(argv[1]).is_dir():
            return 0
        kept, size, removed = prune(argv[1], float(argv[2]))
        print(f"kernel cache {argv[1]}: {kept} entries, {size / 2**20:.0f} MiB"
              + (f" ({removed} least recently used removed)" if removed else ""))
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        print(summary(argv[1]))
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
