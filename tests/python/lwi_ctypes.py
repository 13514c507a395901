"""liblwi.so through ctypes, exactly as a C host calls it (signatures from include/lwi.h)."""
import ctypes
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64, np.float32, np.float64]
STATUS = ["OK", "INVALID_ARGUMENT", "IO", "FORMAT", "UNSUPPORTED", "DEVICE_UNAVAILABLE", "OUT_OF_MEMORY",
          "CANCELLED", "MODEL_INCOMPATIBLE", "INTERNAL"]
RAS, LPS = 0, 1


def plugin_path() -> Path:
    return Path(os.environ.get("LWI_PLUGIN", ROOT / "target" / "release" / "liblwi.so"))


def cli_path() -> Path:
    return Path(os.environ.get("LWI_CLI", ROOT / "target" / "release" / "lwi"))


def modules(hosts: Path) -> Path:
    """Where host-example/cpp installs the Slicer CLI modules under the `hosts` fixture's prefix."""
    return next((hosts / "install" / "lib").glob("Slicer-*/cli-modules"))


class LwiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{STATUS[status]}: {message}")
        self.status = STATUS[status]
        self.message = message


class Lwi:
    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        L = self.lib
        L.lwi_last_error.restype = ctypes.c_char_p
        L.lwi_version_json.restype = ctypes.c_char_p
        L.lwi_volume_convert.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        L.lwi_volume_read.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        L.lwi_volume_dims.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
        L.lwi_volume_dtype.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        L.lwi_volume_affine.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_double)]
        L.lwi_volume_copy_voxels.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        L.lwi_volume_free.argtypes = [ctypes.c_void_p]

    def _check(self, status: int):
        if status != 0:
            raise LwiError(status, self.lib.lwi_last_error().decode())

    def convert(self, src, dst):
        self._check(self.lib.lwi_volume_convert(str(src).encode(), str(dst).encode()))

    def read(self, path, space=RAS):
        """Returns (voxels as an x,y,z numpy array, 4x4 voxel->world affine in `space`)."""
        h = ctypes.c_void_p()
        self._check(self.lib.lwi_volume_read(str(path).encode(), ctypes.byref(h)))
        try:
            dims = (ctypes.c_int64 * 3)()
            self._check(self.lib.lwi_volume_dims(h, dims))
            code = ctypes.c_int()
            self._check(self.lib.lwi_volume_dtype(h, ctypes.byref(code)))
            aff = (ctypes.c_double * 16)()
            self._check(self.lib.lwi_volume_affine(h, space, aff))
            dtype = np.dtype(DTYPES[code.value])
            shape = tuple(dims)
            out = np.empty(shape, dtype=dtype, order="F")
            self._check(self.lib.lwi_volume_copy_voxels(h, out.ctypes.data, out.nbytes))
            return out, np.array(aff[:], dtype=np.float64).reshape(4, 4)
        finally:
            self.lib.lwi_volume_free(h)
