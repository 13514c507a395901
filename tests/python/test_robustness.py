"""Failure paths as a user meets them through the `lwi` command: every error reaches stderr with a
message naming the call, the file or field and the value; no panic text, no hang, no unbounded
read; a failed call leaves nothing behind."""
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lwi_ctypes import ROOT, cli_path

ARCH = {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
TRAIN = {"spacing": [8.0, 8.0, 8.0], "num_samples": 1, "val_every": 1}


def lwi(*args, timeout=300):
    r = subprocess.run([str(cli_path()), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert "panicked" not in r.stderr and "RUST_BACKTRACE" not in r.stderr, r.stderr
    return r


def error_line(r):
    lines = [l for l in r.stderr.splitlines() if l.startswith("lwi: error:")]
    assert lines, r.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    assert lwi("phantom", "--out", d / "data", "--cases", 2, "--size", "24,24,16", "--spacing", "8,8,8").returncode == 0
    (d / "arch.json").write_text(json.dumps(ARCH))
    (d / "train.json").write_text(json.dumps(TRAIN))
    return d


def fine_tune(work, dataset, epochs=1, config=None):
    return lwi("fine-tune", "--from-scratch", "--dataset", dataset, "--arch-config", work / "arch.json",
               "--config", config or work / "train.json", "--epochs", epochs, "--device", "cpu",
               "--out", work / "m.safetensors")


def test_training_errors_reach_the_user(work):
    ds = work / "data" / "dataset.json"
    r = fine_tune(work, ds, epochs=0)
    assert r.returncode == 1 and "epochs must be at least 1, got 0" in error_line(r)
    r = fine_tune(work, work / "missing.json")
    assert r.returncode == 1 and "missing.json" in error_line(r)
    r = lwi("init-train", "--dataset", ds, "--arch-config", work / "arch.json", "--epochs", 1, "--device", "cpu",
            "--out", work / "i.safetensors")
    line = error_line(r)
    assert "pretext slabs 6" in line and "values that work here: slabs 2" in line, line
    (work / "bad.json").write_text(json.dumps({"lr": "fast"}))
    r = fine_tune(work, ds, config=work / "bad.json")
    assert "lr" in error_line(r)


def test_a_diverging_loss_is_named_as_the_learning_rate(work):
    (work / "lr.json").write_text(json.dumps({**TRAIN, "lr": 1e300}))
    r = fine_tune(work, work / "data" / "dataset.json", epochs=3, config=work / "lr.json")
    assert r.returncode == 1 and "training diverged" in error_line(r) and "lr" in error_line(r)


def copy_dataset(work, name):
    dst = work / name
    shutil.copytree(work / "data", dst)
    ds = json.loads((dst / "dataset.json").read_text())
    return dst, dst / ds["training"][0]["label"]


def test_a_label_value_beyond_the_labels_is_named(work):
    dst, label = copy_dataset(work, "value200")
    img = nib.load(label)
    a = np.asarray(img.dataobj).copy()
    a[1, 2, 3] = 200
    nib.save(nib.Nifti1Image(a.astype(np.uint8), img.affine), label)
    r = fine_tune(work, dst / "dataset.json")
    line = error_line(r)
    assert r.returncode == 1 and "label value 200" in line and label.name in line, line


def test_a_label_on_another_grid_is_refused(work):
    dst, label = copy_dataset(work, "shifted")
    img = nib.load(label)
    affine = img.affine.copy()
    affine[0, 3] += 1000
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), label)
    r = fine_tune(work, dst / "dataset.json")
    assert r.returncode == 1 and "another grid" in error_line(r)


def test_a_fifo_dataset_is_refused_at_once(work):
    fifo = work / "dataset_fifo.json"
    os.mkfifo(fifo)
    r = fine_tune(work, fifo)
    assert r.returncode == 1 and "FIFO" in error_line(r)
    r = fine_tune(work, work / "data" / "dataset.json", config=fifo)  # read by the command itself
    assert r.returncode == 2 and "not a regular file" in error_line(r)


def nrrd_header(fields):
    return ("NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "\n").encode()


def test_nrrd_reads_are_bounded(work):
    base = {"type": "float", "dimension": 3, "sizes": "4 4 4", "space": "left-posterior-superior",
            "space directions": "(1,0,0) (0,1,0) (0,0,1)", "space origin": "(0,0,0)"}
    skip = work / "skip.nrrd"
    skip.write_bytes(nrrd_header({**base, "encoding": "gzip", "byte skip": 2 ** 40}) + gzip.compress(b"\0" * 256))
    r = lwi("info", skip)
    assert r.returncode == 1 and "byte skip" in error_line(r), r.stderr
    detached = work / "zero.nhdr"
    detached.write_text(nrrd_header({**base, "encoding": "raw", "data file": "/dev/zero"}).decode())
    r = lwi("info", detached, timeout=30)
    assert r.returncode == 1 and "/dev/zero" in error_line(r)
    model = work / "zero.safetensors"
    model.symlink_to("/dev/zero")
    r = lwi("info", model, timeout=30)
    assert r.returncode == 1 and "character device" in error_line(r)


def test_a_failed_segment_leaves_nothing(work, tiny_model):
    image = work / "data" / "imagesTr" / "phantom_000.nii.gz"
    out = work / "seg" / "phantom_000.nii.gz"
    out.parent.mkdir()
    Path(str(out) + ".json").mkdir()  # the manifest's place is taken
    r = lwi("segment", "--model", tiny_model, image, "--out", out, "--device", "cpu")
    assert r.returncode == 1 and not out.exists(), r.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["phantom_000.nii.gz.json"]


def test_the_demo_configuration_warns_of_nothing(work):
    demo = ROOT / "scripts" / "demo"
    r = lwi("fine-tune", "--from-scratch", "--dataset", work / "data" / "dataset.json", "--arch-config",
            demo / "arch.json", "--config", work / "train.json", "--epochs", 1, "--device", "cpu",
            "--out", work / "demo.safetensors")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "epoch 1/1 loss" in r.stderr and "epoch 0" not in r.stderr, r.stderr


def test_set_up_names_what_it_cannot_install(tmp_path):
    """scripts/setup-system installs missing system packages with apt-get; where it cannot, it says which."""
    script = ROOT / "scripts" / "setup-system"
    bare = tmp_path / "bin"  # a PATH with none of the tools and no apt-get
    bare.mkdir()
    (bare / "id").symlink_to(shutil.which("id"))
    r = subprocess.run(["/bin/bash", str(script)], env={"PATH": str(bare)}, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    for package in ["gcc", "g++", "cmake", "pkg-config", "libxml2-utils", "valgrind", "npm", "python3"]:
        assert package in r.stderr, r.stderr
    assert "install these packages by hand" in r.stderr
    done = subprocess.run([str(script)], capture_output=True, text=True)  # make test ran it: nothing is missing
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_pictures_show_three_planes_a_legend_and_the_training_curves(work, tiny_model):
    from PIL import Image
    model = work / "curves.safetensors"
    r = lwi("fine-tune", "--from-scratch", "--dataset", work / "data" / "dataset.json", "--arch-config",
            work / "arch.json", "--config", work / "train.json", "--epochs", 2, "--device", "cpu", "--out", model)
    assert r.returncode == 0, r.stderr
    info = json.loads(lwi("info", model).stdout)
    assert [e["epoch"] for e in info["provenance"]["history"]["fine_tune"]] == [1, 2]
    assert r.returncode == 0 and lwi("render", "--curves", model, "--out", work / "curves.png").returncode == 0
    assert Image.open(work / "curves.png").size == (900, 480)
    r = lwi("render", "--curves", tiny_model, "--out", work / "none.png")
    assert r.returncode == 2 and "no training history" in error_line(r)
    image, label = work / "data" / "imagesTr" / "phantom_000.nii.gz", work / "data" / "labelsTr" / "phantom_000.nii.gz"
    one = lwi("render", "--image", image, "--labels", label, "--model", model, "--out", work / "one.png")
    two = lwi("render", "--image", image, "--labels", label, "--reference", label, "--model", model,
              "--out", work / "two.png")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    (w1, h1), (w2, h2) = Image.open(work / "one.png").size, Image.open(work / "two.png").size
    assert w1 == w2 and h2 > 1.8 * h1 and w1 > 3 * 300  # a second row; three planes of ~320 px and a legend


def test_an_output_the_command_writes_itself_fails_whole(work, tiny_model):
    """`lwi render` and `lwi evaluate --json` write their files through a temporary name: an output
    that cannot be made is exit 1 naming it (the work failed, the command line was fine), and no
    partial or temporary file stays behind."""
    image, label = work / "data" / "imagesTr" / "phantom_000.nii.gz", work / "data" / "labelsTr" / "phantom_000.nii.gz"
    taken = work / "taken.png"
    taken.mkdir()  # the output's place is a folder: the rename cannot replace it
    r = lwi("render", "--image", image, "--labels", label, "--out", taken)
    assert r.returncode == 1 and "taken.png" in error_line(r), r.stderr
    report = work / "taken.json"
    report.mkdir()
    r = lwi("evaluate", "--pred", label, "--ref", label, "--json", report)
    assert r.returncode == 1 and "taken.json" in error_line(r), r.stderr
    assert "dice" in r.stdout  # the table was printed before the report failed
    assert not [p.name for p in work.iterdir() if ".tmp-" in p.name]
    r = lwi("segment", "--model", tiny_model, image, "--out", work / "data" / "dataset.json" / "x", "--device", "cpu")
    assert r.returncode == 1 and "dataset.json" in error_line(r), r.stderr
