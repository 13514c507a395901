"""The benchmark harness's own duties (bench/): a failing reference program shows why it failed, and the UNETR++
training-step reference builds nnU-Net's deep-supervision targets in torch exactly as nnU-Net's data loader does."""
import sys

import numpy as np
import pytest
import torch

from lwi_ctypes import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402
from pytorch_unetr_pp_train_step import SCALES, deep_supervision_targets  # noqa: E402


def test_a_reference_programs_import_error_is_shown_not_only_its_exit_status():
    lwi_side = [sys.executable, "-c", "print('{\"median_ms\": 1.0}')"]
    reference = [sys.executable, "-c", "import a_module_the_gpu_machine_lacks"]
    with pytest.raises(RuntimeError) as e:
        run.alternate("import error", lwi_side, reference, "reference", 1)
    assert "ModuleNotFoundError: No module named 'a_module_the_gpu_machine_lacks'" in str(e.value)
    assert "a_module_the_gpu_machine_lacks" in str(e.value).splitlines()[0]  # the command, first


def test_a_program_that_prints_no_timing_says_so():
    with pytest.raises(RuntimeError, match="printed no JSON line"):
        run.last_json([sys.executable, "-c", "print('done')"])


@pytest.mark.parametrize("shape", [(64, 128, 128), (17, 45, 30)])
def test_the_deep_supervision_targets_are_nnunets(shape):
    from nnunet.training.data_augmentation.downsampling import downsample_seg_for_ds_transform2

    torch.manual_seed(0)
    y = torch.randint(0, 14, (2, 1, *shape)).float()
    ours = deep_supervision_targets(y)
    theirs = downsample_seg_for_ds_transform2(y.numpy(), SCALES)
    assert [tuple(t.shape) for t in ours] == [t.shape for t in theirs]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a.numpy(), b)
