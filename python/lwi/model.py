"""Engines and models: a model is loaded once and is immutable afterwards; `segment` is stateless, releases the
GIL and may run from several threads on one Model at once (each call with its own buffers)."""
from __future__ import annotations

import ctypes
import json
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from ._native import check, lib, text
from .errors import Error
from .progress import ProgressSink, run_long
from .volume import PathLike, Volume, as_volume

VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm")
UINT8, UINT16 = 0, 2  # LwiDtype codes of label maps


def _options(options: Dict[str, Any]) -> bytes:
    """Options as the engine's JSON; None means "the default", so it is left out. Unknown names stay the
    engine's error, which names them."""
    return json.dumps({k: v for k, v in options.items() if v is not None}).encode()


class Engine:
    """Where work runs: `device` "auto" (the first GPU, else the CPU), "cpu" or "cuda:N"; `threads`: libtorch's
    CPU thread pool (per process). Models keep working after their engine is gone."""

    def __init__(self, device: str = "auto", *, threads: Optional[int] = None):
        self.device = device
        handle = ctypes.c_void_p()
        check(lib.lwi_engine_create(_options({"device": device, "threads": threads}), ctypes.byref(handle)),
              "lwi_engine_create")
        self._handle = handle
        self._finalizer = weakref.finalize(self, lib.lwi_engine_free, handle)

    def __repr__(self) -> str:
        return f"lwi.Engine(device={self.device!r})"


@dataclass(frozen=True)
class SegmentedFile:
    """What `Model.segment_files` did with one input."""

    input: Path
    output: Path
    status: str
    """"written", "skipped" (the output existed) or "failed"."""
    error: Optional[Error] = None


class Model:
    """A model file loaded onto a device. `segment` accepts a path, an `lwi.Volume`, a numpy array with `affine=`
    and `space=`, a nibabel or a SimpleITK image, and returns the label map on that input's own grid."""

    def __init__(self, path: PathLike, *, device: Optional[str] = None, precision: Optional[str] = None,
                 threads: Optional[int] = None, engine: Optional[Engine] = None):
        if not Path(path).exists():
            raise FileNotFoundError(f"lwi.Model: {os.fspath(path)} does not exist")
        if engine is not None and (device is not None or threads is not None):
            raise ValueError("pass either engine= or device=/threads=, not both")
        self.engine = engine if engine is not None else Engine(device or "auto", threads=threads)
        self.path = Path(path)
        self.precision = precision
        handle = ctypes.c_void_p()
        check(lib.lwi_model_load(self.engine._handle, text(path), ctypes.byref(handle)), "lwi_model_load")
        self._handle = handle
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, lib.lwi_model_free, handle)
        self.info: Dict[str, Any] = json.loads(lib.lwi_model_info_json(handle).decode("utf-8"))
        self.labels: Dict[int, str] = {int(k): v for k, v in self.info.get("labels", {}).items()}
        self.device: str = self.info.get("device", "")

    def __repr__(self) -> str:
        return f"lwi.Model({str(self.path)!r}, arch={self.info.get('arch')!r}, device={self.device!r})"

    # --- lifetime: close() frees once no call is running ---------------------------------------------------
    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Frees the model once the calls running with it have returned; later calls raise ValueError."""
        with self._lock:
            self._closed = True
            idle = self._in_flight == 0
        if idle:
            self._finalizer()

    def _enter(self) -> ctypes.c_void_p:
        with self._lock:
            if self._closed:
                raise ValueError(f"{self!r} is closed")
            self._in_flight += 1
            return self._handle

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            idle = self._closed and self._in_flight == 0
        if idle:
            self._finalizer()

    # --- segmenting ----------------------------------------------------------------------------------------
    def segment(self, x: Any, *, affine: Any = None, space: Optional[str] = None, series: Optional[str] = None,
                progress: ProgressSink = None, cancel: Optional[threading.Event] = None, **options: Any) -> Volume:
        """Segments `x` and returns its label map (uint8, or uint16 beyond 256 classes) on `x`'s grid.

        `options` are `lwi_segment`'s (docs/segmentation.md): overlap, blend, sw_batch, mirror (former name
        tta_axes), resample, precision, slab, largest_component, max_gpu_accumulator_mb, ...; one a model's
        pipeline cannot honour raises ValueError naming it. `progress`: None for a bar on
        a terminal, False for none, or a callable taking `lwi.Progress` (raising in it cancels). `cancel`: a
        `threading.Event` another thread may set. Ctrl-C cancels and raises KeyboardInterrupt."""
        volume = as_volume(x, affine=affine, space=space, series=series)
        if self.precision is not None:
            options.setdefault("precision", self.precision)
        code = UINT8 if len(self.labels) <= 256 else UINT16
        labels = np.empty(volume.shape, dtype=np.uint8 if code == UINT8 else np.uint16, order="F")
        lent = volume.lent()
        opts = _options(options)
        handle = self._enter()
        try:
            run_long(lambda fn: lib.lwi_segment(handle, ctypes.byref(lent), labels.ctypes.data, code, labels.nbytes,
                                                opts, fn, None),
                     progress, cancel, check)
        finally:
            self._leave()
        return Volume(labels, volume.affine)

    def segment_files(self, inputs: Iterable[PathLike], out: PathLike, *, overwrite: bool = False,
                      manifest: bool = True, on_error: str = "raise", output_type: str = "auto",
                      progress: ProgressSink = None, cancel: Optional[threading.Event] = None,
                      **options: Any) -> List[SegmentedFile]:
        """Segments files into `out` (a folder; or a file for a single input) as `lwi segment` does: each output
        on its input's grid, written through a temporary name, with its OUTPUT.json manifest; an output that exists
        is skipped unless `overwrite`, so a rerun resumes a half-done batch. `on_error="skip"` records a failed
        input and goes on. `output_type` in a folder: "auto" (the input's own; NIfTI for DICOM), "nifti", "nrrd",
        "dicom-seg"."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        sources = [Path(p) for p in inputs]
        out = Path(out)
        single = len(sources) == 1 and str(out).lower().endswith(VOLUME_ENDINGS) and not out.is_dir()
        if not single:
            out.mkdir(parents=True, exist_ok=True)
        options["manifest"] = manifest
        if self.precision is not None:
            options.setdefault("precision", self.precision)
        opts = _options(options)
        done: List[SegmentedFile] = []
        for source in sources:
            target = out if single else out / _output_name(source, output_type)
            if target.exists() and not overwrite:
                done.append(SegmentedFile(source, target, "skipped"))
                continue
            handle = self._enter()
            try:
                run_long(lambda fn: lib.lwi_segment_file(handle, text(source), text(target), opts, fn, None),
                         progress, cancel, check)
                done.append(SegmentedFile(source, target, "written"))
            except Error as e:
                if on_error == "raise":
                    raise
                done.append(SegmentedFile(source, target, "failed", e))
            finally:
                self._leave()
        return done


def _output_name(source: Path, output_type: str) -> str:
    """`lwi segment`'s name for `source` in an output folder."""
    name = source.name or "output"
    ending = next((e for e in VOLUME_ENDINGS if name.lower().endswith(e)), "")
    stem = name[: len(name) - len(ending)] if ending else name
    if output_type == "dicom-seg":
        return stem + ".dcm"
    if output_type == "nifti":
        return stem + ".nii.gz"
    if output_type == "nrrd":
        return stem + ".nrrd"
    if output_type != "auto":
        raise ValueError(f"output_type must be 'auto', 'nifti', 'nrrd' or 'dicom-seg', not {output_type!r}")
    if source.is_dir() or ending == ".dcm" or name.upper() == "DICOMDIR":
        return stem + ".nii.gz"
    return name
