"""pytest setup for the Python package: the package from the build tree
(PYTHONPATH=<build>/python, which ./build.sh test sets) and the repository's
tools/ (the seed module's loader) and golden data."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
GOLDEN = REPO / "tests" / "golden" / "data"


@pytest.fixture(scope="session")
def seed_attend():
    """The original module's class, exec'd from $ATTEND_SEED_FILE; skipped without it."""
    from seed_module import SeedFileError, load_attend
    try:
        return load_attend()
    except SeedFileError as error:
        pytest.skip(f"the original module is not available: {error}")
