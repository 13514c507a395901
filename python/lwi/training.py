"""Training (init-train, fine-tune), evaluation, checkpoint import and synthetic datasets: the engine's calls with
the options the `lwi` command and its JSON configs take (docs/training.md, docs/models.md). Options are passed
through as they are: an unknown or misspelt one is the engine's error, naming it."""
from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from . import _native
from ._native import check, lib, text
from .model import Engine, _options
from .progress import ProgressSink, run_long
from .volume import PathLike

Config = Union[Mapping[str, Any], PathLike, None]


def _config(config: Config, overrides: Dict[str, Any]) -> Dict[str, Any]:
    if config is None:
        merged: Dict[str, Any] = {}
    elif isinstance(config, Mapping):
        merged = dict(config)
    else:
        with open(config, encoding="utf-8") as f:
            merged = json.load(f)
        if not isinstance(merged, dict):
            raise ValueError(f"{os.fspath(config)}: a training config is a JSON object")
    merged.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("dataset", "out", "init"):
        if isinstance(merged.get(key), os.PathLike):
            merged[key] = os.fspath(merged[key])
    return merged


def _train(entry: str, config: Config, engine: Optional[Engine], progress: ProgressSink,
           cancel: Optional[threading.Event], overrides: Dict[str, Any]) -> Path:
    cfg = _config(config, overrides)
    if "out" not in cfg:
        raise ValueError(f"{entry}: the config needs `out` (the model file to write)")
    engine = engine if engine is not None else Engine(cfg.get("device", "auto"))
    payload = json.dumps(cfg).encode()
    fn = getattr(lib, entry)
    run_long(lambda trampoline: fn(engine._handle, payload, trampoline, None), progress, cancel, check)
    return Path(cfg["out"])


def init_train(config: Config = None, *, engine: Optional[Engine] = None, progress: ProgressSink = None,
               cancel: Optional[threading.Event] = None, **overrides: Any) -> Path:
    """Stage 1, learnable weight initialization. `config` is docs/training.md's JSON (a mapping or a file),
    `overrides` replace its keys (dataset=, out=, epochs=, arch_config=, device=, ...). Returns the model file
    written. Ctrl-C stops within one iteration, keeps the last checkpoint (`OUT.ckpt`, continued with
    resume=True) and raises KeyboardInterrupt; no model file is left by a cancelled call."""
    return _train("lwi_init_train", config, engine, progress, cancel, overrides)


def fine_tune(config: Config = None, *, engine: Optional[Engine] = None, progress: ProgressSink = None,
              cancel: Optional[threading.Event] = None, **overrides: Any) -> Path:
    """Stage 2, fine-tuning for segmentation, from `init=` (an init-train model, whose architecture it takes) or
    from scratch. Otherwise as `init_train`."""
    return _train("lwi_fine_tune", config, engine, progress, cancel, overrides)


def evaluate(pred: PathLike, ref: PathLike, *, labels: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Dice and HD95 (mm) of a prediction against a reference: two label files on one grid, or two folders matched
    by file name. Returns the report (per case and label, per-label means, `synapse_8_mean`)."""
    out = ctypes.c_void_p()
    opts = _options({"labels": list(labels) if labels is not None else None})
    check(lib.lwi_evaluate(text(pred), text(ref), opts, ctypes.byref(out)), "lwi_evaluate")
    return json.loads(_native.take_string(out))


def import_checkpoint(src: PathLike, out: PathLike, *, arch: str, labels: Mapping[Any, str],
                      arch_config: Optional[Mapping[str, Any]] = None, plans: Optional[PathLike] = None,
                      spacing: Optional[Sequence[float]] = None, window: Optional[Sequence[float]] = None,
                      ct_normalization: Optional[Sequence[float]] = None) -> Path:
    """A PyTorch checkpoint (UNETR `.pt`; UNETR++ nnU-Net v1 `.model` or a state dict) into an lwi model file.
    The pickle is parsed, never executed. `arch`: "unetr" or "unetr_pp"; `arch_config`: the upstream constructor's
    keyword arguments; `labels`: {value: name}; `plans`: the nnU-Net plans pickle (UNETR++)."""
    options = {
        "arch": arch,
        "arch_config": dict(arch_config) if arch_config is not None else None,
        "labels": {str(k): v for k, v in labels.items()},
        "plans": os.fspath(plans) if plans is not None else None,
        "spacing": list(spacing) if spacing is not None else None,
        "window": list(window) if window is not None else None,
        "ct_normalization": list(ct_normalization) if ct_normalization is not None else None,
    }
    check(lib.lwi_model_import(text(src), _options(options), text(out)), "lwi_model_import")
    return Path(out)


def phantom_dataset(out_dir: PathLike, *, cases: Optional[int] = None, seed: Optional[int] = None,
                    size: Optional[Sequence[int]] = None, spacing: Optional[Sequence[float]] = None) -> Path:
    """Writes a synthetic abdominal CT dataset (MSD layout: imagesTr/, labelsTr/, dataset.json) and returns the
    path of its dataset.json. Same options, same bytes."""
    opts = _options({"cases": cases, "seed": seed, "size": list(size) if size is not None else None,
                     "spacing": list(spacing) if spacing is not None else None})
    check(lib.lwi_phantom_dataset(text(out_dir), opts), "lwi_phantom_dataset")
    return Path(out_dir) / "dataset.json"
