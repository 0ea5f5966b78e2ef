"""Loads the original PyTorch `Attend` module from the seed file.

The module (naturalspeech2-pytorch, attend.py) lives in shared/seed/, beside
this repository, as a markdown-ish file whose Python code sits between the
first pair of ``` fence lines. Its code is exec'd from there, never copied.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SEED = REPO.parent / "shared" / "seed" / "000_edd5e010b2cbceaa.txt"


def load_attend(seed_path=DEFAULT_SEED):
    """Returns the Attend class defined by the seed file's code."""
    lines = Path(seed_path).read_text(encoding="utf-8").splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("```"))
    code = "\n".join(lines[start + 1:end]) + "\n"
    namespace = {"__name__": "seed_attend"}
    exec(compile(code, str(seed_path), "exec"), namespace)
    return namespace["Attend"]
