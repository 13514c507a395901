"""The three CLI modules as 3D Slicer runs them: Slicer's own code (PyPI slicer-core in .venv-slicer, made by
scripts/setup-slicer) parses their descriptors, composes their command lines, runs them, follows their progress,
cancels them and reads their outputs back into nodes (tests/python/slicer_host.py, in a subprocess, writes the
report checked here). Training runs on phantoms with a tiny UNETR; segmentation of TotalSegmentator's real CT, as
LPS NRRD, as NIfTI and oblique, into a label map and into a segmentation."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lwi_ctypes import ROOT, cli_path, modules

SLICER_PY = ROOT / ".venv-slicer" / "bin" / "python"
TS = "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def slicer(hosts, testdata, tmp_path_factory):
    assert SLICER_PY.exists(), f"{SLICER_PY} is missing: run scripts/setup-slicer (make setup does)"
    work = tmp_path_factory.mktemp("slicer")
    subprocess.run([str(cli_path()), "phantom", "--out", str(work / "data"), "--cases", "2", "--size", "48,48,32",
                    "--spacing", "6,6,8"], check=True, capture_output=True)
    (work / "init.json").write_text(json.dumps({"spacing": [8.0, 8.0, 8.0], "num_samples": 1, "pretext": {"slabs": 2}}))
    terminology = next((ROOT / ".venv-slicer").glob(
        "lib/python3*/site-packages/trame_slicer/resources/terminologies/"
        "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.term.json"))
    report = work / "report.json"
    r = subprocess.run([str(SLICER_PY), str(HERE / "slicer_host.py"), "--modules", str(modules(hosts)), "--work",
                        str(work), "--dataset", str(work / "data" / "dataset.json"), "--arch",
                        str(ROOT / "tests" / "c" / "arch.json"), "--init-config", str(work / "init.json"),
                        "--tune-config", str(ROOT / "tests" / "c" / "train.json"),
                        "--ct", str(testdata / TS / "example_ct_sm.nii.gz"), "--terminology", str(terminology),
                        "--report", str(report)],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DISPLAY": "", "LWI_CLI": str(cli_path())})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(report.read_text())


def test_slicer_finds_exactly_the_three_modules_and_reads_their_sidecar_descriptors(slicer):
    assert slicer["registered"] == {"LwiFineTune": "sidecar", "LwiInitTrain": "sidecar", "LwiSegment": "sidecar"}
    d = slicer["descriptors"]
    assert all(m["parse_rc"] == 0 for m in d.values()), d
    assert d["LwiSegment"]["parameters"] == ["inputVolume", "outputVolume", "model", "device", "overlap", "tta"]
    assert d["LwiFineTune"]["parameters"] == ["dataset", "outputModel", "init", "architecture", "archConfig",
                                              "config", "epochs", "seed", "device"]
    assert "init" not in d["LwiInitTrain"]["parameters"]


@pytest.mark.parametrize("stage", ["init_train", "fine_tune"])
def test_training_runs_through_slicer_with_progress(slicer, stage):
    run = slicer[stage]
    assert run["status"] == "Completed" and run["error_text"] == "", run
    assert run["model_written"]
    assert any(0 < p < 100 for p in run["progress"]), run["progress"]


def test_a_cancelled_training_keeps_its_checkpoint_and_writes_no_model(slicer):
    run = slicer["cancel_training"]
    assert run["status"] == "Cancelled" and not run["model_written"], run
    assert run["checkpoint"] and Path(run["checkpoint"]).stat().st_size > 0


@pytest.mark.parametrize("case", ["nrrd/vtkMRMLLabelMapVolumeNode", "oblique/vtkMRMLLabelMapVolumeNode", "nifti"])
def test_the_label_map_slicer_loads_is_on_the_input_grid(slicer, case):
    run = slicer["segment"][case]
    assert run["status"] == "Completed" and run["error_text"] == "", run
    assert run["dims"] == run["input_dims"]
    np.testing.assert_allclose(run["ijk_to_ras"], run["input_ijk_to_ras"], atol=1e-4)
    assert run["geometry_differs"] == ""  # vtkSlicerVolumesLogic::CompareVolumeGeometry's own verdict
    assert any(0 < p < 100 for p in run["progress"])


def test_the_label_map_lands_beside_its_input_in_the_subject_hierarchy(slicer):
    assert slicer["segment"]["nrrd/vtkMRMLLabelMapVolumeNode"]["sh_parent_is_input_parent"]


@pytest.mark.parametrize("case", ["nrrd", "oblique"])
def test_a_segmentation_output_has_the_models_names_colours_and_terminology(slicer, case):
    """The route Slicer's CLI logic supports for names: a segmentation node as the output (Slicer offers it for a
    `type="label"` image); its storage node reads the segmentation fields of lwi's NRRD."""
    run = slicer["segment"][f"{case}/vtkMRMLSegmentationNode"]
    assert run["status"] == "Completed", run
    labels = {int(k): v for k, v in slicer["model_labels"].items() if k != "0"}
    got = {s["value"]: s for s in run["segments"]}
    assert {v: s["name"] for v, s in got.items()} == labels
    # SNOMED CT codes as Slicer's General Anatomy list has them, read back through its terminology logic.
    assert got[1]["type"] == "78961009" and got[1]["modifier"] is None  # spleen
    assert got[2]["type"] == "64033007" and got[2]["modifier"] == "24028007"  # kidney, right
    assert got[6]["type"] == "10200004"  # liver
    np.testing.assert_allclose(got[6]["color"], np.array([221, 130, 101]) / 255, atol=1e-3)
    np.testing.assert_allclose(run["exported_ijk_to_ras"], run["input_ijk_to_ras"], atol=1e-4)
    assert run["exported_dims"] == run["input_dims"]


def test_a_cancelled_segmentation_loads_nothing(slicer):
    run = slicer["cancel_segment"]
    assert run["status"] == "Cancelled" and not run["output_loaded"], run


def test_a_bad_model_file_reaches_the_node_naming_the_file(slicer):
    run = slicer["bad_model"]
    assert run["status"] == "Completed with errors"
    assert run["bad_path"] in run["error_text"], run["error_text"]


def test_nothing_of_ours_is_left_in_slicers_temporary_folder(slicer):
    assert slicer["temp_leftovers"] == []
