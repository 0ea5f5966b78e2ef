"""Loads the original PyTorch `Attend` module from the seed file.

The seed file holds the source of the original module (naturalspeech2-pytorch,
naturalspeech2_pytorch/attend.py) as a markdown-ish text file: a title line,
then the Python code between the first pair of ``` fence lines. It is not part
of this repository; its path comes from an explicit argument or else from the
environment variable ATTEND_SEED_FILE:

    export ATTEND_SEED_FILE=/path/to/000_edd5e010b2cbceaa.txt

Its code is exec'd from there, never copied. Only the golden-data generator
(tests/golden/make_golden.py) and bench/compare_torch.py's "seed math" column
need it; the test suite does not.
"""
import os
from pathlib import Path

ENV_VAR = "ATTEND_SEED_FILE"

_WHAT = ("the seed file is the original naturalspeech2-pytorch `Attend` module source (attend.py) as a "
         "markdown-ish text file, its Python code between the first pair of ``` lines")


class SeedFileError(RuntimeError):
    """The seed file is not given, missing, or holds no fenced code."""


def seed_path(path=None):
    """The seed file's path: `path` if given, else $ATTEND_SEED_FILE; raises SeedFileError when
    neither is set or the file does not exist."""
    source = "the path given"
    if path is None or str(path) == "":
        path, source = os.environ.get(ENV_VAR, ""), f"${ENV_VAR}"
        if not path:
            raise SeedFileError(f"{ENV_VAR} is not set: {_WHAT}. Set it to that file's path, e.g. "
                                f"`export {ENV_VAR}=/path/to/000_edd5e010b2cbceaa.txt`, or pass the path explicitly.")
    path = Path(path).expanduser()
    if not path.is_file():
        raise SeedFileError(f"seed file {path} ({source}) does not exist or is not a file: {_WHAT}. "
                            f"Point {ENV_VAR} (or the explicit path) at that file.")
    return path


def load_attend(path=None):
    """Returns the Attend class defined by the seed file's code: the file at `path`, else at
    $ATTEND_SEED_FILE (see seed_path)."""
    path = seed_path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    fences = [i for i, line in enumerate(lines) if line.strip().startswith("```")]
    if len(fences) < 2:
        raise SeedFileError(f"seed file {path} has no pair of ``` lines around the module's code: {_WHAT}.")
    # Blank lines in place of the text before the code: tracebacks name the file's own line numbers.
    code = "\n" * (fences[0] + 1) + "\n".join(lines[fences[0] + 1:fences[1]]) + "\n"
    namespace = {"__name__": "seed_attend"}
    exec(compile(code, str(path), "exec"), namespace)
    if "Attend" not in namespace:
        raise SeedFileError(f"seed file {path}: its code defines no `Attend` class: {_WHAT}.")
    return namespace["Attend"]
