"""The wheel as a user installs it: `make wheel`'s lwi-*.whl into a fresh virtual environment (torch and the rest
offline from .cache/wheelhouse, which scripts/setup-libtorch fills once), used from a folder outside the checkout with LD_LIBRARY_PATH unset — the `lwi` command, the Python API,
3D Slicer's own CLI machinery running the wheel's module, a C++ host built against the wheel's CMake package —
and the same liblwi.so against a libtorch without CUDA (PyTorch's CPU-only layout)."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lwi_ctypes import ROOT

TS = "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"
SLICER_PY = ROOT / ".venv-slicer" / "bin" / "python"
PINS = ["torch==2.11.0", "numpy==2.3.5", "nibabel==5.4.2", "SimpleITK==2.5.2"]
TINY_ARCH = {"img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 24, "mlp_dim": 48, "num_heads": 4}
# What PyTorch's CPU-only builds ship in torch/lib (libtorch.so there needs libtorch_cpu alone).
CPU_ONLY_LIBS = ["libc10.so", "libtorch_cpu.so", "libtorch_global_deps.so", "libtorch_python.so", "libshm.so",
                 "libgomp.so.1"]


def clean_env(**extra):
    """The environment of a user's shell: nothing of the checkout or of a build."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "LWI_PLUGIN", "LWI_CLI", "PYTHONPATH", "VIRTUAL_ENV", "LIBTORCH")}
    env.update(extra)
    return env


def run(cmd, cwd, check=True, **kw):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=kw.pop("env", clean_env()),
                       **kw)
    if check:
        assert r.returncode == 0, f"{cmd}: rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


class Env:
    def __init__(self, root: Path, work: Path):
        self.root, self.work = root, work
        self.python = root / "bin" / "python"
        self.lwi = root / "bin" / "lwi"
        self.site = Path(run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
                             work).stdout.strip())
        self.package = self.site / "lwi"

    def py(self, code, **kw):
        """Runs Python code in the environment; its last stdout line is JSON."""
        r = run([self.python, "-c", textwrap.dedent(code)], self.work, **kw)
        return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel():
    found = sorted((ROOT / "target" / "wheels").glob("lwi-*.whl"), key=lambda p: p.stat().st_mtime)
    if not found:
        pytest.fail("no wheel in target/wheels: run `make wheel` (make test does)")
    return found[-1]


@pytest.fixture(scope="module")
def env(wheel, tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    work = base / "work"
    work.mkdir()
    run([shutil.which("python3"), "-m", "venv", base / "venv"], work)
    house = ROOT / ".cache" / "wheelhouse"
    assert any(house.glob("torch-2.11.0-*.whl")), f"{house} lacks torch: run scripts/setup-libtorch (make setup does)"
    run([base / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-index", "--find-links", house, wheel, *PINS], work, timeout=1200)
    return Env(base / "venv", work)


@pytest.fixture(scope="module")
def trained(env, testdata):
    """`lwi phantom` and `lwi fine-tune` of the installed command: a tiny UNETR trained for two epochs."""
    d = env.work / "trained"
    run([env.lwi, "phantom", "--out", d / "data", "--cases", "3", "--size", "48,48,32", "--spacing", "6,6,8"],
        env.work)
    (d / "arch.json").write_text(json.dumps(TINY_ARCH))
    (d / "tune.json").write_text(json.dumps({"spacing": [8, 8, 8], "num_samples": 2, "val_every": 1}))
    run([env.lwi, "fine-tune", "--from-scratch", "--dataset", d / "data" / "dataset.json", "--arch-config",
         d / "arch.json", "--config", d / "tune.json", "--epochs", "2", "--device", "cpu", "--out",
         d / "model.safetensors"], env.work)
    return d / "model.safetensors"


@pytest.fixture(scope="module")
def imported(env, tiny_model):
    """`lwi import` of the installed command: seeded UNETR weights (MONAI's layout) working at 8 mm, whose labels
    vary over a real CT."""
    d = tiny_model.parent
    out = env.work / "imported.safetensors"
    run([env.lwi, "import", "--from", d / "monai_layout.pt", "--arch-config", d / "arch.json", "--labels",
         d / "labels.json", "--spacing", "8,8,8", "--out", out], env.work)
    return out


def elf_files(folder: Path):
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.read_bytes()[:4] == b"\x7fELF"]


def dynamic(path: Path):
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+)\]", out)
    paths = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.+)\]", out)
    soname = re.findall(r"\(SONAME\)\s+Library soname: \[(.+)\]", out)
    return needed, [p for entry in paths for p in entry.split(":") if p], soname


def test_no_elf_file_names_a_path_of_the_build_and_none_needs_cuda(env, wheel):
    files = elf_files(env.package)
    names = {f.relative_to(env.package).as_posix() for f in files}
    assert {"lib/liblwi.so", "bin/lwi", "bin/lwi_host"} <= names
    assert {n.rsplit("/", 1)[-1] for n in names if "cli-modules" in n} == {"LwiSegment", "LwiInitTrain", "LwiFineTune"}
    floor = tuple(int(x) for x in re.search(r"manylinux_(\d+)_(\d+)", wheel.name).groups())
    for f in files:
        needed, paths, soname = dynamic(f)
        assert all(p.startswith("$ORIGIN") for p in paths), f"{f}: RUNPATH {paths}"
        assert not any("cuda" in n or n.startswith("libnv") for n in needed), f"{f} needs {needed}"
        symbols = subprocess.run(["objdump", "-T", str(f)], capture_output=True, text=True).stdout
        highest = max((tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_(\d+\.\d+)", symbols)),
                      default=(2, 0))
        assert highest <= floor, f"{f} uses GLIBC_{highest}, the wheel's tag promises {floor}"
    assert dynamic(env.package / "lib" / "liblwi.so")[1:] == (["$ORIGIN/../../torch/lib"], ["liblwi.so"])
    assert dynamic(env.package / "bin" / "lwi_host")[1] == ["$ORIGIN/../lib"]
    meta = run([env.python, "-m", "pip", "show", "lwi"], env.work).stdout
    assert "Requires: numpy, torch" in meta


def test_the_command_and_the_slicer_path_work_from_the_wheel(env):
    info = json.loads(run([env.lwi, "info"], env.work).stdout)
    assert info["libtorch_version"] == "2.11.0" and info["cuda_available"] is False
    assert Path(info["plugin"]).resolve() == (env.package / "lib" / "liblwi.so").resolve()
    assert json.loads(run([env.python, "-m", "lwi", "info"], env.work).stdout)["abi_version"] == 1
    folder = Path(run([env.lwi, "slicer-path"], env.work).stdout.strip())
    assert folder.is_relative_to(env.package)
    assert {p.name for p in folder.iterdir()} == {"LwiSegment", "LwiSegment.xml", "LwiInitTrain", "LwiInitTrain.xml",
                                                  "LwiFineTune", "LwiFineTune.xml"}
    # the native command without Python, as Slicer or a shell would start it
    native = json.loads(run([env.package / "bin" / "lwi", "info"], env.work).stdout)
    assert Path(native["plugin"]).resolve() == (env.package / "lib" / "liblwi.so").resolve()


def test_python_segments_a_real_ct_as_the_command_does_on_the_readers_geometry(env, imported, testdata):
    ct = testdata / TS / "example_ct.nii.gz"
    out = env.work / "ct_labels.nii.gz"
    run([env.lwi, "segment", "--model", imported, ct, "--out", out, "--device", "cpu"], env.work)
    got = env.py(f"""
        import json, lwi, nibabel as nib, numpy as np, SimpleITK as sitk
        ct, out = {str(ct)!r}, {str(out)!r}
        model = lwi.Model({str(imported)!r}, device="cpu")
        cli = np.asanyarray(nib.load(out).dataobj)
        api = model.segment(ct, progress=False)
        from_nib = model.segment(nib.load(ct), progress=False)
        from_sitk = model.segment(sitk.ReadImage(ct), progress=False)
        v, img, ref = lwi.read(ct), nib.load(ct), sitk.ReadImage(ct)
        s = v.to_sitk()
        print(json.dumps({{
            "labels": [int(x) for x in np.unique(cli)],
            "api": bool(np.array_equal(api.array, cli)), "nib": bool(np.array_equal(from_nib.array, cli)),
            "sitk": bool(np.array_equal(from_sitk.array, cli)),
            "affine": float(np.abs(api.affine - img.affine).max()),
            "nib_affine": float(np.abs(v.affine - img.affine).max()),
            "sitk_origin": float(np.abs(np.subtract(s.GetOrigin(), ref.GetOrigin())).max()),
            "sitk_direction": float(np.abs(np.subtract(s.GetDirection(), ref.GetDirection())).max()),
            "sitk_spacing": float(np.abs(np.subtract(s.GetSpacing(), ref.GetSpacing())).max()),
            "version": lwi.__version__, "typed": (lwi.__file__ and __import__("os").path.exists(
                __import__("os").path.join(__import__("os").path.dirname(lwi.__file__), "py.typed")))}}))
    """)
    assert len(got["labels"]) > 1 and got["api"] and got["nib"] and got["sitk"], got
    assert got["affine"] < 1e-5 and got["nib_affine"] < 1e-5, got
    assert got["sitk_origin"] < 1e-4 and got["sitk_direction"] < 1e-6 and got["sitk_spacing"] < 1e-6, got
    assert got["version"] == "0.1.0" and got["typed"]


def test_python_training_reports_progress_and_a_cancel_leaves_no_model_file(env, trained):
    data = trained.parent / "data" / "dataset.json"
    got = env.py(f"""
        import json, lwi
        cfg = {{"dataset": {str(data)!r}, "arch": {TINY_ARCH!r}, "spacing": [8, 8, 8], "num_samples": 1,
               "val_every": 1, "device": "cpu"}}
        events = []
        out = lwi.fine_tune(cfg, out="py.safetensors", epochs=2, progress=events.append)
        def stop(p):
            if p.epoch == 1:
                raise KeyboardInterrupt
        try:
            lwi.fine_tune(cfg, out="cancelled.safetensors", epochs=5, checkpoint_every=1, progress=stop)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        import os
        print(json.dumps({{"written": out.exists(), "epochs": sorted({{p.epoch for p in events if p.epoch is not None}}),
                          "interrupted": interrupted, "cancelled_model": os.path.exists("cancelled.safetensors"),
                          "checkpoint": os.path.exists("cancelled.safetensors.ckpt")}}))
    """)
    assert got == {"written": True, "epochs": [0, 1], "interrupted": True, "cancelled_model": False,
                   "checkpoint": True}


@pytest.mark.parametrize("order", ["import torch; import lwi", "import lwi; import torch"])
def test_torch_and_lwi_share_one_libtorch(env, order):
    got = env.py(f"""
        {order}
        import json
        maps = {{l.split()[-1] for l in open("/proc/self/maps") if "libtorch_cpu.so" in l}}
        print(json.dumps({{"sum": float((torch.ones(3) * 2).sum()), "engine": lwi.build_info()["libtorch_version"],
                          "torch": torch.__version__.split("+")[0], "copies": len(maps)}}))
    """)
    assert got == {"sum": 6.0, "engine": "2.11.0", "torch": "2.11.0", "copies": 1}


def test_slicers_own_cli_logic_runs_the_wheels_module(env, imported, testdata):
    assert SLICER_PY.exists(), f"{SLICER_PY} is missing: run scripts/setup-slicer (make setup does)"
    folder = run([env.lwi, "slicer-path"], env.work).stdout.strip()
    report = env.work / "slicer.json"
    run([SLICER_PY, Path(__file__).parent / "slicer_host.py", "--modules", folder, "--work", env.work / "slicer",
         "--ct", testdata / TS / "example_ct_sm.nii.gz", "--model", imported, "--report", report], env.work,
        env=clean_env(DISPLAY=""), timeout=600)
    got = json.loads(report.read_text())
    assert set(got["registered"]) == {"LwiSegment", "LwiInitTrain", "LwiFineTune"}
    seg = got["segment"]
    assert seg["status"] == "Completed" and seg["error_text"] == "", seg
    assert not seg["geometry_differs"] and len(seg["values"]) > 1, seg


def test_a_cpp_host_builds_against_the_wheels_cmake_package_and_runs(env, trained):
    prefix = run([env.python, "-c", "import lwi; print(lwi.cmake_prefix_path)"], env.work).stdout.strip()
    build = env.work / "cpp"
    run(["cmake", "-S", ROOT / "host-example" / "cpp", "-B", build, "-DLWI_USE_PACKAGE=ON",
         f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"], env.work)
    run(["cmake", "--build", build, "--target", "lwi_host", "-j2"], env.work)
    _, paths, _ = dynamic(build / "lwi_host")
    assert paths == [str(env.package / "lib")], "built against the wheel's liblwi.so"
    d = trained.parent
    (d / "init.json").write_text(json.dumps({"spacing": [8, 8, 8], "num_samples": 1, "pretext": {"slabs": 2}}))
    r = run([build / "lwi_host", "--dataset", d / "data" / "dataset.json", "--arch", d / "arch.json", "--init-config",
             d / "init.json", "--tune-config", d / "tune.json", "--work", env.work / "host", "--init-epochs", "1",
             "--tune-epochs", "1", "--device", "cpu", d / "data" / "imagesTr" / "phantom_002.nii.gz"], env.work)
    assert "dice" in r.stdout and (env.work / "host" / "phantom_002.nii.gz").exists()


def test_the_same_files_run_on_a_libtorch_without_cuda(env, imported, testdata):
    """PyTorch's CPU-only layout, made from the installed CUDA torch: its torch/lib without any CUDA library and a
    libtorch.so that needs libtorch_cpu alone. liblwi.so must load there, report no CUDA and segment on the CPU."""
    site = env.work / "cpu-only" / "site-packages"
    lib = site / "torch" / "lib"
    lib.mkdir(parents=True)
    for name in CPU_ONLY_LIBS:
        os.link(env.site / "torch" / "lib" / name, lib / name)
    # libtorch_cpu of the CUDA build still needs the CUDA runtime (not the driver), found beside it as in torch's wheel
    (site / "nvidia").symlink_to(env.site / "nvidia")
    stub = env.work / "cpu-only" / "libtorch.c"
    stub.write_text("void lwi_test_cpu_only_libtorch(void) {}\n")
    run(["cc", "-shared", "-fPIC", stub, "-o", lib / "libtorch.so", "-Wl,-soname,libtorch.so", "-Wl,--no-as-needed",
         f"-L{lib}", "-ltorch_cpu", "-Wl,-rpath,$ORIGIN"], env.work)
    shutil.copytree(env.package, site / "lwi", symlinks=True)
    assert not list(lib.glob("*cuda*")) and not list(lib.glob("libnv*"))
    info = json.loads(run([site / "lwi" / "bin" / "lwi", "info"], env.work).stdout)
    assert info["cuda_available"] is False and info["devices"] == ["cpu"]
    ct = testdata / TS / "example_ct.nii.gz"
    reference = env.work / "ct_labels_cuda_layout.nii.gz"
    run([env.lwi, "segment", "--model", imported, ct, "--out", reference, "--device", "cpu"], env.work)
    got = env.py(f"""
        import json, lwi, numpy as np, nibabel as nib
        labels = lwi.Model({str(imported)!r}).segment({str(ct)!r}, progress=False)
        maps = {{l.split()[-1] for l in open("/proc/self/maps") if "libtorch" in l or "libc10" in l}}
        print(json.dumps({{"equal": bool(np.array_equal(labels.array, np.asanyarray(nib.load({str(reference)!r}).dataobj))),
                          "cuda": lwi.build_info()["cuda_available"], "maps": sorted(maps)}}))
    """, env=clean_env(PYTHONPATH=str(site)))
    assert got["equal"] and got["cuda"] is False
    assert all(m.startswith(str(lib)) for m in got["maps"]) and not any("cuda" in m for m in got["maps"]), got["maps"]
