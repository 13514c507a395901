"""The hosts as their users run them: the C++ example host (init-train → fine-tune → segment, Ctrl-C), the 3D
Slicer CLI module LwiSegment called with Slicer's conventions, and the installed CMake / pkg-config package."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lwi_ctypes import ROOT, cli_path, modules

XSD = ROOT.parent / "shared" / "slicer" / "ModuleDescription.xsd"
TS = "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"


def schema_for_libxml2(tmp_path):
    """Slicer's schema as libxml2 can use it for what Slicer accepts. It declares enumerationType's `hidden` attribute
    a second time, after its complexContent: invalid XSD 1.0 that libxml2 rejects (the base paramType declares it);
    that one declaration is dropped. And it lags Slicer's parser, which decides (tests/python/test_slicer_host.py):
    Slicer's own Modules/CLI/ExecutionModelTour/ExecutionModelTour.xml gives a `<file>` a `<longflag>` and no
    `<index>`, and a `<string-enumeration>` several `<element>`s; the copy allows both."""
    text = XSD.read_text()
    fixed, n = re.subn(r'(</xsd:complexContent>)\s*<xsd:attribute name="hidden" type="xsd:boolean"/>', r"\1", text)
    assert n == 1
    indexed = re.search(r'<xsd:complexType name="indexedParamType" >.*?</xsd:complexType>', fixed, re.S).group(0)
    flagged = indexed.replace('<xsd:element name="index" type="xsd:nonNegativeInteger"/>',
                              '<xsd:element name="index" type="xsd:nonNegativeInteger" minOccurs="0"/>'
                              '<xsd:element name="flag" type="flagType" minOccurs="0"/>'
                              '<xsd:element name="longflag" type="flagType" minOccurs="0"/>')
    assert flagged != indexed
    fixed = fixed.replace(indexed, flagged)
    fixed, n = re.subn(r'<xsd:element name="element" type="xsd:string"/>',
                       '<xsd:element name="element" type="xsd:string" maxOccurs="unbounded"/>', fixed)
    assert n == 1
    p = tmp_path / "ModuleDescription.xsd"
    p.write_text(fixed)
    return p


@pytest.mark.parametrize("module", ["LwiSegment", "LwiInitTrain", "LwiFineTune"])
def test_descriptor_validates_against_slicers_schema(hosts, tmp_path, module):
    """Each module's --xml is its installed sidecar NAME.xml, byte for byte, and valid against Slicer's schema."""
    xml = subprocess.run([str(hosts / "build" / module), "--xml"], capture_output=True, text=True, check=True).stdout
    assert xml == (modules(hosts) / f"{module}.xml").read_text()
    (tmp_path / "d.xml").write_text(xml)
    original = subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(tmp_path / "d.xml")], capture_output=True, text=True)
    assert "failed to compile" in original.stderr, "if Slicer's schema compiles as-is, drop the workaround"
    r = subprocess.run(["xmllint", "--noout", "--schema", str(schema_for_libxml2(tmp_path)), str(tmp_path / "d.xml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert module != "LwiSegment" or '<image type="label" reference="inputVolume"' in xml


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz"])
def test_slicer_runs_the_module_on_an_lps_volume(hosts, tiny_model, testdata, tmp_path, ext):
    # Slicer writes the input with ITK: LPS, its own geometry fields.
    image = sitk.ReadImage(str(testdata / TS / "example_ct_sm.nii.gz"))
    inp, out = tmp_path / f"input{ext}", tmp_path / f"output{ext}"
    sitk.WriteImage(image, str(inp))
    r = subprocess.run([str(modules(hosts) / "LwiSegment"), "--device", "cpu", "--overlap", "0.5",
                        str(inp), str(out), str(tiny_model)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "<filter-start>" in r.stdout and "<filter-progress>1.0000</filter-progress>" in r.stdout
    assert not Path(f"{out}.json").exists(), "no manifest: Slicer would leave it in its temporary folder"
    labels = sitk.ReadImage(str(out))
    assert labels.GetSize() == image.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(labels.GetDirection(), image.GetDirection(), atol=1e-6)
    # the same labels as the lwi command gives on the same file
    ref = tmp_path / f"cli{ext}"
    subprocess.run([str(cli_path()), "segment", "--model", str(tiny_model), str(inp), "--out", str(ref), "--device", "cpu",
                    "--no-manifest"], check=True, capture_output=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(sitk.ReadImage(str(ref))))


def test_module_errors_go_to_stderr_with_a_non_zero_exit(hosts, tmp_path):
    r = subprocess.run([str(hosts / "build" / "LwiSegment"), "--device", "cpu", str(tmp_path / "missing.nrrd"),
                        str(tmp_path / "out.nrrd"), str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert r.returncode == 1 and "missing.safetensors" in r.stderr
    assert not (tmp_path / "out.nrrd").exists()


@pytest.mark.parametrize("module, args, message", [
    ("LwiSegment", ["--overlap", "half", "in.nrrd", "out.nrrd", "m.safetensors"], "--overlap: not a number: half"),
    ("LwiInitTrain", ["--epochs", "ten", "d.json", "m.safetensors"], "--epochs: not a whole number >= 0: ten"),
    ("LwiFineTune", ["--seed", "-1", "d.json", "m.safetensors"], "--seed: not a whole number >= 0: -1"),
    ("LwiFineTune", ["--config", "missing.json", "d.json", "m.safetensors"], "training config missing.json: cannot be read"),
])
def test_a_bad_module_value_is_named_before_any_work(hosts, tmp_path, module, args, message):
    r = subprocess.run([str(hosts / "build" / module), *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "<filter-start>" not in r.stdout
    assert not (tmp_path / "m.safetensors").exists()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    d = tmp_path_factory.mktemp("host-data")
    subprocess.run([str(cli_path()), "phantom", "--out", str(d / "data"), "--cases", "4", "--size", "48,48,32",
                    "--spacing", "6,6,8"], check=True, capture_output=True)
    (d / "arch.json").write_text(json.dumps({"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96,
                                             "num_heads": 4}))
    (d / "init.json").write_text(json.dumps({"spacing": [8, 8, 8], "num_samples": 2, "pretext": {"slabs": 2}}))
    (d / "tune.json").write_text(json.dumps({"spacing": [8, 8, 8], "num_samples": 2, "val_every": 2}))
    return d


def host_cmd(hosts, d, work, epochs):
    return [str(hosts / "install" / "bin" / "lwi_host"), "--dataset", str(d / "data" / "dataset.json"), "--arch",
            str(d / "arch.json"), "--init-config", str(d / "init.json"), "--tune-config", str(d / "tune.json"),
            "--work", str(work), "--init-epochs", str(epochs), "--tune-epochs", str(epochs), "--device", "cpu",
            str(d / "data" / "imagesTr" / "phantom_003.nii.gz")]


def test_cpp_host_runs_init_train_fine_tune_segment(hosts, phantoms, tmp_path):
    r = subprocess.run(host_cmd(hosts, phantoms, tmp_path, 2), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("epoch ") >= 4 and "dice" in r.stdout
    assert (tmp_path / "phantom_003.nii.gz").exists() and (tmp_path / "model.safetensors").exists()


def test_cpp_host_cancels_on_ctrl_c(hosts, phantoms, tmp_path):
    p = subprocess.Popen(host_cmd(hosts, phantoms, tmp_path, 500), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if "epoch 1/" in line:
            p.send_signal(signal.SIGINT)
            break
    p.wait(timeout=60)
    assert p.returncode == 130, p.stderr.read()
    assert not (tmp_path / "init.safetensors").exists(), "no model file from a cancelled run"
    assert (tmp_path / "init.safetensors.ckpt").exists(), "its last complete checkpoint stays"


def test_nothing_installed_names_the_checkout(hosts):
    """`cmake --install` rewrites liblwi.so's RUNPATH (the build's names the checkout's libtorch) to the installed
    layout's, and gives the executables paths relative to themselves."""
    runpaths = {}
    for f in sorted((hosts / "install").rglob("*")):
        if f.is_file() and f.read_bytes()[:4] == b"\x7fELF":
            out = subprocess.run(["readelf", "-d", str(f)], capture_output=True, text=True, check=True).stdout
            runpaths[f.relative_to(hosts / "install").as_posix()] = re.findall(r"R(?:UN)?PATH\)\s+Library r(?:un)?path: \[(.+)\]", out)
    assert runpaths["lib/liblwi.so"] == ["$ORIGIN/../../torch/lib"]
    assert runpaths["bin/lwi_host"] == ["$ORIGIN/../lib"]
    assert all(p.startswith("$ORIGIN") for paths in runpaths.values() for entry in paths for p in entry.split(":")), \
        runpaths


def test_slicer_fine_tune_takes_the_architecture_of_its_initial_weights(hosts, phantoms, tmp_path):
    """LwiFineTune as Slicer calls it (every parameter given, --arch at its default "auto", no architecture config):
    the init model's architecture is trained; an explicit architecture that differs is refused naming both."""
    init = tmp_path / "init.safetensors"
    r = subprocess.run([str(cli_path()), "init-train", "--dataset", str(phantoms / "data" / "dataset.json"),
                        "--arch-config", str(phantoms / "arch.json"), "--config", str(phantoms / "init.json"),
                        "--epochs", "1", "--device", "cpu", "--out", str(init)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    module = [str(modules(hosts) / "LwiFineTune"), "--init", str(init), "--config", str(phantoms / "tune.json"),
              "--epochs", "1", "--seed", "0", "--device", "cpu"]
    out = tmp_path / "model.safetensors"
    r = subprocess.run([*module, "--arch", "auto", str(phantoms / "data"), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(subprocess.run([str(cli_path()), "info", str(out)], capture_output=True, text=True).stdout)
    arch = json.loads((phantoms / "arch.json").read_text())
    assert info["stage"] == "segmentation" and info["config"] == dict(info["config"], **arch)
    refused = tmp_path / "refused.safetensors"
    r = subprocess.run([*module, "--arch", "unetr", str(phantoms / "data"), str(refused)], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "differs from the architecture of init" in r.stderr, r.stderr
    assert '"feature_size":16' in r.stderr and '"feature_size":8' in r.stderr
    assert not refused.exists()


def test_a_training_module_sets_its_fields_over_a_config_file_that_has_them(hosts, phantoms, tmp_path):
    """Slicer passes every field (Epochs, Seed at their defaults): a --config file holding the same keys is layered
    under them, not refused as a key given twice."""
    config = tmp_path / "tune.json"
    config.write_text(json.dumps({**json.loads((phantoms / "tune.json").read_text()), "epochs": 50, "seed": 5}))
    out = tmp_path / "model.safetensors"
    r = subprocess.run([str(modules(hosts) / "LwiFineTune"), "--arch", "unetr", "--arch_config", str(phantoms / "arch.json"),
                        "--config", str(config), "--epochs", "1", "--seed", "0", "--device", "cpu",
                        str(phantoms / "data"), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("epoch 1/1") >= 1 and "epoch 2/" not in r.stdout, r.stdout[-2000:]


def test_installed_package_serves_cmake_and_pkg_config_hosts(hosts, tmp_path):
    prefix = hosts / "install"
    run = lambda *cmd, **kw: subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)
    run("cmake", "-S", ROOT / "tests" / "cmake-consumer", "-B", tmp_path / "b", f"-DCMAKE_PREFIX_PATH={prefix}")
    run("cmake", "--build", tmp_path / "b")
    out = run(tmp_path / "b" / "consumer").stdout
    assert out.startswith("abi 1") and '"libtorch_version":"2.11.0"' in out
    env = dict(os.environ, PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig"))
    flags = run("pkg-config", "--cflags", "--libs", "lwi", env=env).stdout.split()
    run("c++", "-std=c++17", ROOT / "tests" / "cmake-consumer" / "main.cpp", "-o", tmp_path / "pc", *flags)
    assert run(tmp_path / "pc").stdout.startswith("abi 1")


def test_cpp_host_is_clean_under_valgrind(hosts, tmp_path):
    """The C++ host's whole run (init-train → fine-tune → segment) under memcheck: no invalid read or write and
    no definitely-lost block. Only the two libtorch/glibc reports in tests/valgrind/libtorch.supp are hidden,
    each with its reason; the log is kept in the test report."""
    d = tmp_path
    subprocess.run([str(cli_path()), "phantom", "--out", str(d / "data"), "--cases", "4", "--size", "24,24,16",
                    "--spacing", "8,8,8"], check=True, capture_output=True)
    (d / "arch.json").write_text(json.dumps({"img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 24,
                                             "mlp_dim": 48, "num_heads": 2}))
    (d / "init.json").write_text(json.dumps({"spacing": [8, 8, 8], "num_samples": 1, "pretext": {"slabs": 2}}))
    (d / "tune.json").write_text(json.dumps({"spacing": [8, 8, 8], "num_samples": 1, "val_every": 1}))
    log = d / "memcheck.log"
    cmd = ["valgrind", "--tool=memcheck", "--leak-check=full", "--show-leak-kinds=definite",
           "--errors-for-leak-kinds=definite", "--error-exitcode=99", "--num-callers=40",
           f"--suppressions={ROOT / 'tests' / 'valgrind' / 'libtorch.supp'}", f"--log-file={log}",
           *host_cmd(hosts, d, d / "work", 1)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    text = log.read_text()
    assert r.returncode == 0, f"{r.stderr}\n{text[-6000:]}"
    assert "segmented" in r.stdout and (d / "work" / "phantom_003.nii.gz").exists()
    assert "ERROR SUMMARY: 0 errors" in text and "definitely lost: 0 bytes" in text
    summary = [line.split("== ", 1)[-1] for line in text.splitlines() if re.search(r"(lost|reachable|ERROR SUMMARY):", line)]
    (ROOT / "target" / "test-reports").mkdir(parents=True, exist_ok=True)
    (ROOT / "target" / "test-reports" / "valgrind.txt").write_text(
        "C++ host (init-train → fine-tune → segment) under valgrind memcheck:\n" + "\n".join(summary) + "\n")


def test_slicer_module_takes_a_dicom_folder(hosts, tiny_model, testdata, tmp_path):
    """Run from the command line on a DICOM folder, the module writes labels on the series' grid (as SimpleITK reads it)."""
    folder = testdata / TS / "example_ct_dicom"
    out = tmp_path / "labels.nrrd"
    r = subprocess.run([str(modules(hosts) / "LwiSegment"), "--device", "cpu", str(folder), str(out),
                        str(tiny_model)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image, labels = reader.Execute(), sitk.ReadImage(str(out))
    assert labels.GetSize() == image.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), image.GetDirection(), atol=1e-6)


def test_slicer_module_takes_a_unetr_pp_model_unchanged(hosts, tmp_path):
    """LwiSegment with an imported UNETR++ model: nnU-Net's pipeline through the same C ABI call, on the
    input's grid, the same labels as the lwi command."""
    from test_unetr_pp import NORM, REDUCED, ct_case, nnunet_checkpoint, upstream_state_dict
    ckpt, arch, labels = tmp_path / "pp.model", tmp_path / "arch.json", tmp_path / "labels.json"
    nnunet_checkpoint(upstream_state_dict(["synapse_reduced.weights.safetensors"]), ckpt)
    arch.write_text(json.dumps({**REDUCED, "out_channels": 3}))
    labels.write_text(json.dumps({"0": "background", "1": "a", "2": "b"}))
    model = tmp_path / "pp.safetensors"
    subprocess.run([str(cli_path()), "import", "--from", str(ckpt), "--arch-config", str(arch), "--labels", str(labels),
                    "--spacing", "1.5,1.5,2", "--ct-norm", ",".join(map(str, NORM)), "--out", str(model)],
                   check=True, capture_output=True)
    ct_case(tmp_path / "ct.nii.gz")
    inp, out, ref = tmp_path / "input.nrrd", tmp_path / "output.nrrd", tmp_path / "cli.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "ct.nii.gz")), str(inp))
    r = subprocess.run([str(modules(hosts) / "LwiSegment"), "--device", "cpu", str(inp), str(out), str(model)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    subprocess.run([str(cli_path()), "segment", "--model", str(model), str(inp), "--out", str(ref), "--device", "cpu",
                    "--no-manifest"], check=True, capture_output=True)
    got, want = sitk.ReadImage(str(out)), sitk.ReadImage(str(ref))
    assert got.GetSize() == sitk.ReadImage(str(inp)).GetSize()
    np.testing.assert_allclose(got.GetDirection(), sitk.ReadImage(str(inp)).GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))
    assert len(np.unique(sitk.GetArrayFromImage(got))) > 1
