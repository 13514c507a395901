"""The engine's statuses as exceptions: one `lwi.Error` subclass per status, each also the builtin a Python user
would catch (a bad value is a `ValueError`, a refused file an `OSError`, ...). All of them pickle, so they cross
process pools."""
from __future__ import annotations

import enum
from typing import Dict, Type


class Status(enum.IntEnum):
    """`LwiStatus` of lwi.h."""

    OK = 0
    INVALID_ARGUMENT = 1
    IO = 2
    FORMAT = 3
    UNSUPPORTED = 4
    DEVICE_UNAVAILABLE = 5
    OUT_OF_MEMORY = 6
    CANCELLED = 7
    MODEL_INCOMPATIBLE = 8
    INTERNAL = 9


class Error(Exception):
    """A call into the engine failed: `.status` says how, `.message` is the engine's own message."""

    status = Status.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(Error, ValueError):
    status = Status.INVALID_ARGUMENT


class FileAccessError(Error, OSError):
    status = Status.IO


class FormatError(Error, ValueError):
    status = Status.FORMAT


class UnsupportedError(Error, ValueError):
    status = Status.UNSUPPORTED


class DeviceUnavailableError(Error, RuntimeError):
    status = Status.DEVICE_UNAVAILABLE


class OutOfMemoryError(Error, MemoryError):
    status = Status.OUT_OF_MEMORY


class CancelledError(Error):
    status = Status.CANCELLED


class ModelIncompatibleError(Error, ValueError):
    status = Status.MODEL_INCOMPATIBLE


class InternalError(Error, RuntimeError):
    status = Status.INTERNAL


_BY_STATUS: Dict[int, Type[Error]] = {
    cls.status: cls
    for cls in (InvalidArgumentError, FileAccessError, FormatError, UnsupportedError, DeviceUnavailableError,
                OutOfMemoryError, CancelledError, ModelIncompatibleError, InternalError)
}


def error_for(status: int, message: str) -> Error:
    """The exception of an engine status (an unknown one is an `InternalError` saying so)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        return InternalError(f"unknown status {status}: {message}")
    return cls(message)
