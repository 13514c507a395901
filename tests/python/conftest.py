import os
import subprocess
import sys
from pathlib import Path

import pytest

from lwi_ctypes import ROOT, Lwi, cli_path, plugin_path

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
def tiny_model(tmp_path_factory):
    """A tiny UNETR (MONAI layout, seeded weights) imported as an lwi model working at 4 mm."""
    d = tmp_path_factory.mktemp("tiny_model")
    here = Path(__file__).parent
    subprocess.run([sys.executable, str(here / "monai_unetr_reference.py"), "--checkpoints", str(d)], check=True)
    r = subprocess.run([str(cli_path()), "import", "--from", str(d / "monai_layout.pt"), "--arch-config", str(d / "arch.json"),
                        "--labels", str(d / "labels.json"), "--spacing", "4,4,4", "--out", str(d / "model.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d / "model.safetensors"


@pytest.fixture(scope="session")
def coarse_model(tiny_model):
    """`tiny_model`'s weights working at 8 mm: a real CT (TotalSegmentator's, 122x101x112 at 3 mm) becomes ~27
    windows, a second or two on the CPU, for tests that segment it many times."""
    out = tiny_model.parent / "coarse.safetensors"
    if not out.exists():
        d = tiny_model.parent
        r = subprocess.run([str(cli_path()), "import", "--from", str(d / "monai_layout.pt"), "--arch-config",
                            str(d / "arch.json"), "--labels", str(d / "labels.json"), "--spacing", "8,8,8", "--out",
                            str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def hosts(tmp_path_factory):
    """host-example/cpp configured, built and installed with CMake (lwi_host in bin/, the Slicer modules in
    lib/Slicer-X.Y/cli-modules/: `lwi_ctypes.modules`). The prefix `install/` lies beside `torch/` as a package
    of a Python environment lies beside torch's (the installed liblwi.so's default RUNPATH, `$ORIGIN/../../torch/lib`):
    what is installed names nothing of the checkout."""
    d = tmp_path_factory.mktemp("cpp")
    (d / "torch").symlink_to((ROOT / ".venv" / "libtorch").resolve())
    run = lambda *cmd: subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True)
    run("cmake", "-S", ROOT / "host-example" / "cpp", "-B", d / "build", f"-DLWI_ROOT={ROOT}", "-DCMAKE_BUILD_TYPE=Release")
    run("cmake", "--build", d / "build", "-j2")
    run("cmake", "--install", d / "build", "--prefix", d / "install")
    return d


@pytest.fixture(scope="session")
def report():
    """Tables a test wants shown at the end of the run (outcome per corpus file, ...)."""
    return REPORTS.append


def pytest_terminal_summary(terminalreporter):
    for text in REPORTS:
        terminalreporter.write_line(text)
