"""lwi: 3-D medical image segmentation with learnable weight initialization (UNETR, UNETR++) on libtorch.

    import lwi
    model = lwi.Model("model.safetensors")          # device="auto": the first GPU, else the CPU
    labels = model.segment("ct.nii.gz")             # a path, lwi.Volume, array + affine, nibabel, SimpleITK
    labels.write("labels.nii.gz")                   # on the input's own grid

The engine is liblwi.so, loaded with ctypes on the libtorch of the installed `torch` package (no compiled
Python extension); `import lwi` does not import torch. docs/python.md has the whole API."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from . import _native
from .errors import (CancelledError, DeviceUnavailableError, Error, FileAccessError, FormatError, InternalError,
                     InvalidArgumentError, ModelIncompatibleError, OutOfMemoryError, Status, UnsupportedError)
from .model import Engine, Model, SegmentedFile
from .progress import Progress
from .training import evaluate, fine_tune, import_checkpoint, init_train, phantom_dataset
from .volume import Volume, dicom_series, read

cmake_prefix_path: str = str(_native.PACKAGE_DIR)
"""For CMake: `-DCMAKE_PREFIX_PATH="$(python -c 'import lwi; print(lwi.cmake_prefix_path)')"` gives
`find_package(lwi)` and the target `lwi::lwi`, as `torch.utils.cmake_prefix_path` does for Torch."""


def get_include() -> str:
    """The folder holding lwi.h and lwi.hpp."""
    return str(_native.PACKAGE_DIR / "include")


def get_library() -> str:
    """The path of the liblwi.so this package loaded."""
    return str(_native.library_path())


def build_info() -> Dict[str, Any]:
    """The engine's build: lwi and libtorch versions, CUDA and cuDNN, devices, GPUs, threads (paste it into bug
    reports)."""
    return json.loads(_native.lib.lwi_version_json().decode("utf-8"))


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("lwi")
    except PackageNotFoundError:
        return str(build_info().get("lwi_version", "0+unknown"))


__version__ = _version()

__all__ = [
    "Volume", "read", "dicom_series", "Engine", "Model", "SegmentedFile", "Progress",
    "init_train", "fine_tune", "evaluate", "import_checkpoint", "phantom_dataset",
    "Error", "Status", "InvalidArgumentError", "FileAccessError", "FormatError", "UnsupportedError",
    "DeviceUnavailableError", "OutOfMemoryError", "CancelledError", "ModelIncompatibleError", "InternalError",
    "cmake_prefix_path", "get_include", "get_library", "build_info", "__version__",
]
