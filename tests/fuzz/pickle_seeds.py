"""Seeds for the `pickle` fuzz target, written into the folder given: nnU-Net v1 plans as its planner and
save_checkpoint write them (plans.pkl, model.pkl), and the data.pkl of checkpoints as torch.save writes them (a
MONAI state dict; nnU-Net's trainer dict with numpy scalars). Small on purpose: libFuzzer mutates short inputs
better."""
import io
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from test_unetr_pp import nnunet_plans  # noqa: E402


def data_pkl(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    plans = nnunet_plans([2.0, 0.76, 0.76], [64, 128, 128])
    (out / "plans.pkl").write_bytes(pickle.dumps(plans))
    (out / "plans_protocol2.pkl").write_bytes(pickle.dumps(plans, protocol=2))
    info = OrderedDict(init=("plans.pkl", 0), name="unetr_pp_trainer_synapse", plans=plans)
    (out / "model.pkl").write_bytes(pickle.dumps(info))
    sd = OrderedDict(("enc.%d.weight" % i, torch.zeros(2, 2)) for i in range(3))
    sd["enc.0.num_batches_tracked"] = torch.tensor(0)
    (out / "state_dict.data.pkl").write_bytes(data_pkl(sd))
    trainer = {"epoch": 1000, "state_dict": sd, "plot_stuff": ([np.float64(0.5)], [0.6], [0.7], [0.8]),
               "best_stuff": (999, 0.5, np.float64(0.8)), "lr_scheduler_state_dict": None}
    (out / "trainer.data.pkl").write_bytes(data_pkl(trainer))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
