"""liblwi.so through ctypes: finding and loading it, its structs and signatures (include/lwi.h), and the
one place a status becomes an exception.

ctypes releases the GIL for the length of every foreign call, so long calls (segment, training) leave other
Python threads running."""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path
from typing import Optional

from .errors import Error, Status, error_for

ABI_VERSION = 1
PACKAGE_DIR = Path(__file__).resolve().parent

c_char_pp = ctypes.POINTER(ctypes.c_char_p)


class LwiVolume(ctypes.Structure):
    """`LwiVolume` of lwi.h: a volume lent to one call."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("dtype", ctypes.c_int32),
        ("dims", ctypes.c_int64 * 3),
        ("data", ctypes.c_void_p),
        ("affine", ctypes.c_double * 16),
        ("space", ctypes.c_int32),
    ]


class LwiProgress(ctypes.Structure):
    """`LwiProgress` of lwi.h (fields are only ever appended; `struct_size` says how many there are)."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("stage", ctypes.c_char_p),
        ("done", ctypes.c_uint64),
        ("total", ctypes.c_uint64),
        ("epoch", ctypes.c_int64),
        ("loss", ctypes.c_double),
        ("metric", ctypes.c_double),
        ("message", ctypes.c_char_p),
        ("rank", ctypes.c_int32),
    ]


PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(LwiProgress))

_p = ctypes.c_void_p
_s = ctypes.c_char_p
_i32 = ctypes.c_int32
# name: (restype, argtypes); a restype of int is an LwiStatus.
SIGNATURES = {
    "lwi_abi_version": (ctypes.c_uint32, []),
    "lwi_last_error": (_s, []),
    "lwi_version_json": (_s, []),
    "lwi_string_free": (None, [_p]),
    "lwi_volume_read": (_i32, [_s, ctypes.POINTER(_p)]),
    "lwi_volume_read_series": (_i32, [_s, _s, ctypes.POINTER(_p)]),
    "lwi_dicom_series_json": (_i32, [_s, ctypes.POINTER(_p)]),
    "lwi_volume_write_lent": (_i32, [ctypes.POINTER(LwiVolume), _s]),
    "lwi_volume_dims": (_i32, [_p, ctypes.POINTER(ctypes.c_int64)]),
    "lwi_volume_dtype": (_i32, [_p, ctypes.POINTER(ctypes.c_int)]),
    "lwi_volume_affine": (_i32, [_p, _i32, ctypes.POINTER(ctypes.c_double)]),
    "lwi_volume_copy_voxels": (_i32, [_p, _p, ctypes.c_size_t]),
    "lwi_volume_free": (None, [_p]),
    "lwi_engine_create": (_i32, [_s, ctypes.POINTER(_p)]),
    "lwi_engine_free": (None, [_p]),
    "lwi_model_load": (_i32, [_p, _s, ctypes.POINTER(_p)]),
    "lwi_model_info_json": (_s, [_p]),
    "lwi_model_free": (None, [_p]),
    "lwi_model_import": (_i32, [_s, _s, _s]),
    "lwi_segment": (_i32, [_p, ctypes.POINTER(LwiVolume), _p, _i32, ctypes.c_size_t, _s, PROGRESS_FN, _p]),
    "lwi_segment_file": (_i32, [_p, _s, _s, _s, PROGRESS_FN, _p]),
    "lwi_evaluate": (_i32, [_s, _s, _s, ctypes.POINTER(_p)]),
    "lwi_init_train": (_i32, [_p, _s, PROGRESS_FN, _p]),
    "lwi_fine_tune": (_i32, [_p, _s, PROGRESS_FN, _p]),
    "lwi_phantom_dataset": (_i32, [_s, _s]),
}


def library_path() -> Path:
    """`$LWI_PLUGIN` if set (as the `lwi` command), else the liblwi.so installed in this package."""
    env = os.environ.get("LWI_PLUGIN")
    return Path(env) if env else PACKAGE_DIR / "lib" / "liblwi.so"


def _torch_library() -> Optional[Path]:
    """libtorch.so of the installed `torch` package, found without importing torch."""
    spec = importlib.util.find_spec("torch")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for where in locations:
        candidate = Path(where) / "lib" / "libtorch.so"
        if candidate.is_file():
            return candidate
    return None


def _load() -> ctypes.CDLL:
    path = library_path()
    if not path.is_file():
        raise ImportError(f"lwi: the engine library {path} does not exist (is the wheel installed whole?)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as first:
        # torch installed in another folder than lwi (a second site-packages): liblwi.so's RUNPATH cannot
        # reach it, so load torch's libtorch first, as `import torch` would; the loader then reuses it.
        torch = _torch_library()
        if torch is None:
            raise ImportError(f"lwi: cannot load {path}: {first}; the `torch` package (2.11) is not installed") from first
        try:
            ctypes.CDLL(str(torch), mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(str(path))
        except OSError as second:
            raise ImportError(f"lwi: cannot load {path} with the libtorch of {torch}: {second}") from second
    abi = lib.lwi_abi_version()
    if abi != ABI_VERSION:
        raise ImportError(f"lwi: {path} implements C ABI {abi}, this Python package speaks {ABI_VERSION}")
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise ImportError(f"lwi: {path} lacks {name}: it is older than this Python package") from e
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


lib = _load()


def last_error() -> str:
    return (lib.lwi_last_error() or b"").decode("utf-8", "replace")


def check(status: int, call: str = "") -> None:
    """Raises the `lwi.Error` subclass of a failed call's status, with the engine's message."""
    if status != Status.OK:
        raise error_for(status, last_error() or f"{call} failed with status {status}")


def take_string(ptr: ctypes.c_void_p) -> str:
    """A string the library returned through an out pointer, copied and freed."""
    if not ptr.value:
        return ""
    try:
        return ctypes.string_at(ptr.value).decode("utf-8", "replace")
    finally:
        lib.lwi_string_free(ptr)


def text(value: "str | os.PathLike[str] | None") -> Optional[bytes]:
    """A Python string or path as the C string the library takes (None stays NULL)."""
    return None if value is None else os.fsencode(value)


__all__ = ["Error", "LwiVolume", "LwiProgress", "PROGRESS_FN", "lib", "check", "take_string", "text"]
