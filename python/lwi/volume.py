"""Volumes: voxels as a numpy array in (i, j, k) order — x fastest, Fortran-contiguous, the order of nibabel,
MONAI and the engine's own buffers — and a 4×4 voxel → RAS matrix. Adapters to nibabel and SimpleITK keep the
geometry those libraries read from the same files."""
from __future__ import annotations

import ctypes
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from . import _native
from ._native import LwiVolume, check, lib, text

log = logging.getLogger("lwi")

PathLike = Union[str, "os.PathLike[str]"]

# LwiDtype codes, in order.
DTYPES = [np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
                                np.int64, np.float32, np.float64)]
RAS, LPS = 0, 1
# RAS ↔ LPS: x and y change sign; its own inverse.
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def _engine_array(array: Any, name: str = "array") -> np.ndarray:
    """`array` as the engine takes it: 3-D, one of the ten voxel types in native byte order, x fastest.
    Copies only when it must (and says so at debug level)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(array).__name__}")
    if array.ndim != 3:
        raise ValueError(f"{name} must have 3 dimensions (i, j, k), it has shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    dtype = array.dtype
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    elif dtype == np.float16:
        dtype = np.dtype(np.float32)
    elif dtype.kind in "uif" and not dtype.isnative:
        dtype = dtype.newbyteorder("=")
    if dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {array.dtype}; lwi takes uint8/16/32/64, int8/16/32/64, float16/32/64 "
                        f"or bool voxels")
    out = np.require(array, dtype=dtype, requirements=["F"])
    if out is not array and not np.shares_memory(out, array):
        log.debug("lwi: %s copied to %s, Fortran order (was %s, %s)", name, dtype, array.dtype,
                  "F" if array.flags.f_contiguous else "not F-contiguous")
    return out


def _checked_affine(affine: Any, name: str = "affine") -> np.ndarray:
    m = np.array(affine, dtype=np.float64, copy=True)
    if m.shape != (4, 4):
        raise ValueError(f"{name} must be a 4x4 matrix, it has shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} holds a value that is not finite: {m.tolist()}")
    if not np.array_equal(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{name}'s last row must be (0, 0, 0, 1), it is {m[3].tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError(f"{name} is singular (its 3x3 part has determinant {np.linalg.det(m[:3, :3]):.3g})")
    m.flags.writeable = False
    return m


def _space_code(space: Any) -> int:
    if isinstance(space, str) and space.upper() in ("RAS", "LPS"):
        return RAS if space.upper() == "RAS" else LPS
    raise ValueError(f"space must be 'RAS' or 'LPS' (the world frame the affine maps into), not {space!r}; "
                     "the voxel orientation is read from the affine itself")


class Volume:
    """Voxels (`array`, (i, j, k), x fastest) and where they lie (`affine`, voxel → RAS millimetres)."""

    __slots__ = ("_array", "_affine", "_owner")

    def __init__(self, array: np.ndarray, affine_ras: np.ndarray, _owner: Any = None):
        self._array = _engine_array(array)
        self._affine = _checked_affine(affine_ras)
        self._owner = _owner  # what `array` is a view of (a SimpleITK image), kept alive with it

    @classmethod
    def from_array(cls, array: np.ndarray, affine: Any, *, space: str, axes: str = "ijk") -> "Volume":
        """A volume from an array and its voxel → world matrix in `space` ("RAS" as nibabel and Slicer, "LPS" as
        ITK and DICOM). `axes="kji"` takes an array in SimpleITK's order (`GetArrayFromImage`) without a copy.
        The array is used in place where it already is x-fastest in an engine type."""
        if axes not in ("ijk", "kji"):
            raise ValueError(f"axes must be 'ijk' (nibabel's order) or 'kji' (SimpleITK's), not {axes!r}")
        code = _space_code(space)
        if isinstance(array, np.ndarray) and axes == "kji":
            array = array.T
        m = _checked_affine(affine)
        return cls(array, _FLIP @ m if code == LPS else m)

    @property
    def array(self) -> np.ndarray:
        """The voxels, (i, j, k) = (x, y, z), Fortran-contiguous. `.T` is SimpleITK's (k, j, i) view."""
        return self._array

    @property
    def affine(self) -> np.ndarray:
        """Voxel (i, j, k, 1) → RAS millimetres, 4x4 float64, read-only (nibabel's `img.affine`)."""
        return self._affine

    @property
    def affine_lps(self) -> np.ndarray:
        """Voxel → LPS millimetres (ITK's, SimpleITK's and DICOM's frame)."""
        return _FLIP @ self._affine

    @property
    def spacing(self) -> tuple:
        """Voxel size in mm along i, j, k (nibabel's `get_zooms()` order)."""
        return tuple(float(s) for s in np.linalg.norm(self._affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple:
        return self._array.shape

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    def __repr__(self) -> str:
        return f"lwi.Volume(shape={self.shape}, dtype={self.dtype}, spacing={tuple(round(s, 4) for s in self.spacing)})"

    def lent(self) -> LwiVolume:
        """This volume as an `LwiVolume` lent to one engine call (valid while this Volume lives)."""
        v = LwiVolume()
        v.struct_size = ctypes.sizeof(LwiVolume)
        v.dtype = DTYPES.index(self._array.dtype)
        v.dims[:] = [int(n) for n in self._array.shape]
        v.data = self._array.ctypes.data
        v.affine[:] = [float(x) for x in self._affine.ravel()]
        v.space = RAS
        return v

    def write(self, path: PathLike) -> Path:
        """Writes the volume (format by extension: .nii, .nii.gz, .nrrd, .nhdr) through a temporary name."""
        lent = self.lent()
        check(lib.lwi_volume_write_lent(ctypes.byref(lent), text(path)), "lwi_volume_write_lent")
        return Path(path)

    # --- nibabel -------------------------------------------------------------------------------------------
    @classmethod
    def from_nibabel(cls, img: Any) -> "Volume":
        """A nibabel image: its data as stored (scaled data as float32, float64 for float64 files, as lwi reads
        the file itself) and `img.affine`. A trailing axis of length 1 is dropped."""
        raw = img.dataobj
        slope, inter = (None, None)
        get_slope_inter = getattr(img.header, "get_slope_inter", None)
        if get_slope_inter is not None and hasattr(raw, "get_unscaled"):
            slope, inter = get_slope_inter()
        scaled = slope is not None and (slope, inter or 0.0) != (1.0, 0.0)
        if scaled:
            stored = img.get_data_dtype()
            array = np.asarray(raw.get_scaled(dtype=np.float64 if stored == np.float64 else np.float32))
        else:
            array = np.asanyarray(raw)
        while array.ndim > 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return cls(array, img.affine)

    def to_nibabel(self) -> Any:
        """A `nibabel.Nifti1Image` of these voxels (in their dtype) and this affine (sform and qform)."""
        nib = _require("nibabel", "nibabel")
        img = nib.Nifti1Image(self._array, np.array(self._affine))
        img.set_data_dtype(self._array.dtype)
        img.set_sform(np.array(self._affine), code=1)
        img.set_qform(np.array(self._affine), code=1)
        return img

    # --- SimpleITK -----------------------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, img: Any) -> "Volume":
        """A SimpleITK image, without copying its voxels (the Volume keeps the image alive)."""
        sitk = _require("SimpleITK", "sitk")
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"a SimpleITK image of dimension {img.GetDimension()} with "
                             f"{img.GetNumberOfComponentsPerPixel()} components: lwi takes 3-D scalar images")
        array = sitk.GetArrayViewFromImage(img).T
        lps = np.eye(4)
        lps[:3, :3] = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3) * np.array(img.GetSpacing())
        lps[:3, 3] = img.GetOrigin()
        return cls(array, _FLIP @ lps, _owner=img)

    def to_sitk(self, *, strip_shear: bool = False) -> Any:
        """A SimpleITK image (one copy of the voxels). ITK takes only orthonormal directions: a sheared affine
        raises ValueError, or with `strip_shear=True` is replaced by the nearest orthonormal one (the largest
        move of a voxel corner, in mm, is logged)."""
        sitk = _require("SimpleITK", "sitk")
        lps = self.affine_lps
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
            if not strip_shear:
                raise ValueError("this volume's affine is sheared (its axes are not orthogonal), which ITK cannot "
                                 "represent; pass strip_shear=True to use the nearest orthonormal directions")
            u, _, vt = np.linalg.svd(direction)
            nearest = u @ vt
            corner = np.array(self.shape, dtype=np.float64) - 1
            moved = np.abs((nearest - direction) @ (spacing * corner)).max()
            log.warning("lwi: shear stripped for SimpleITK; voxel corners move up to %.3g mm", moved)
            direction = nearest
        img = sitk.GetImageFromArray(np.ascontiguousarray(self._array.T))
        img.SetSpacing([float(s) for s in spacing])
        img.SetDirection([float(d) for d in direction.ravel()])
        img.SetOrigin([float(o) for o in lps[:3, 3]])
        return img


def _require(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"this needs {module}: pip install 'lwi[{extra}]'") from e


def read(path: PathLike, *, series: Optional[str] = None) -> Volume:
    """Reads a volume: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or DICOM (a folder, a DICOMDIR or a .dcm file;
    `series` picks a Series Instance UID, default the largest CT/MR series). Voxels keep their stored type."""
    if not Path(path).exists():
        raise FileNotFoundError(f"lwi.read: {os.fspath(path)} does not exist")
    handle = ctypes.c_void_p()
    check(lib.lwi_volume_read_series(text(path), text(series), ctypes.byref(handle)), "lwi_volume_read_series")
    try:
        dims = (ctypes.c_int64 * 3)()
        check(lib.lwi_volume_dims(handle, dims))
        code = ctypes.c_int()
        check(lib.lwi_volume_dtype(handle, ctypes.byref(code)))
        affine = (ctypes.c_double * 16)()
        check(lib.lwi_volume_affine(handle, RAS, affine))
        array = np.empty(tuple(dims), dtype=DTYPES[code.value], order="F")
        check(lib.lwi_volume_copy_voxels(handle, array.ctypes.data, array.nbytes))
    finally:
        lib.lwi_volume_free(handle)
    return Volume(array, np.array(affine[:], dtype=np.float64).reshape(4, 4))


def dicom_series(path: PathLike) -> dict:
    """The DICOM series under `path` (a folder searched recursively, a DICOMDIR or a file): `{"series": [...],
    "skipped": [...]}`, largest series first."""
    out = ctypes.c_void_p()
    check(lib.lwi_dicom_series_json(text(path), ctypes.byref(out)), "lwi_dicom_series_json")
    return json.loads(_native.take_string(out))


def as_volume(x: Any, *, affine: Any = None, space: Optional[str] = None, series: Optional[str] = None,
              name: str = "x") -> Volume:
    """What `Model.segment` accepts as its input, as a Volume: a path, a Volume, an array with `affine` and
    `space`, a nibabel image or a SimpleITK image (recognised without importing either library)."""
    if isinstance(x, Volume):
        return x
    if isinstance(x, (str, os.PathLike)):
        return read(x, series=series)
    if isinstance(x, np.ndarray):
        if affine is None or space is None:
            raise ValueError(f"{name} is an array: pass affine= (its 4x4 voxel → world matrix) and space= "
                             "('RAS' or 'LPS')")
        return Volume.from_array(x, affine, space=space)
    home = type(x).__module__.split(".")[0]
    if home == "nibabel" and hasattr(x, "dataobj") and hasattr(x, "affine"):
        return Volume.from_nibabel(x)
    if home == "SimpleITK" and hasattr(x, "GetDirection"):
        return Volume.from_sitk(x)
    raise TypeError(f"{name} must be a path, an lwi.Volume, a numpy array (with affine= and space=), a nibabel "
                    f"or a SimpleITK image, not {type(x).__name__}")
