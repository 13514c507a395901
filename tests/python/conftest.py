import os
import subprocess
from pathlib import Path

import pytest

from lwi_ctypes import ROOT, Lwi, plugin_path

REPORTS = []


@pytest.fixture(scope="session")
def lwi():
    path = plugin_path()
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make build`")
    return Lwi(path)


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The registry test data; scripts/fetch-test-data fetches it (make test does)."""
    d = Path(os.environ.get("LWI_TESTDATA", ROOT / ".cache" / "testdata"))
    if not (d / "totalsegmentator").is_dir():
        subprocess.run([str(ROOT / "scripts" / "fetch-test-data")], check=True, stdout=subprocess.DEVNULL)
    return d


@pytest.fixture(scope="session")
def report():
    """Tables a test wants shown at the end of the run (outcome per corpus file, ...)."""
    return REPORTS.append


def pytest_terminal_summary(terminalreporter):
    for text in REPORTS:
        terminalreporter.write_line(text)
