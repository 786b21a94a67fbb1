# SPDX-License-Identifier: MIT
"""One exception class per resa_status, carrying the context's own message.

A failed call raises the subclass of its status: `except resa.CapacityError`
catches exactly RESA_ERR_CAPACITY, `except resa.ResaError` every library
failure.  Wrong Python arguments (dtype, shape, device) are TypeError or
ValueError instead, raised before any C call (see _context.py)."""
from ._enums import Status
from ._lib import lib

__all__ = ["ResaError", "InvalidArgumentError", "BadStateError", "OutOfMemoryError",
           "DeviceOutOfMemoryError", "CapacityError", "NotSupportedError", "NoDeviceError",
           "BackendError", "VersionMismatchError", "InternalError", "ContextClosedError",
           "error_for", "check"]


class ResaError(RuntimeError):
    """A libresa call failed.  .status is the Status (an int for a status this
    version does not know), .message the context's last-error text."""

    status = None  # each subclass names its own

    def __init__(self, message="", status=None):
        if status is None:
            status = type(self).status
        try:
            status = Status(status)
        except ValueError:  # a status newer than these bindings stays an int
            pass
        self.status = status
        self.message = message
        name = lib.resa_status_name(int(status)).decode()  # "RESA_ERR_CAPACITY"
        super().__init__("%s: %s" % (name, message) if message else name)


class InvalidArgumentError(ResaError):
    status = Status.ERR_INVALID_ARGUMENT


class BadStateError(ResaError):
    status = Status.ERR_BAD_STATE


class OutOfMemoryError(ResaError):
    """Host memory."""
    status = Status.ERR_OUT_OF_MEMORY


class DeviceOutOfMemoryError(ResaError):
    status = Status.ERR_DEVICE_OUT_OF_MEMORY


class CapacityError(ResaError):
    """KV pool, sequence slots or step size exhausted; nothing changed."""
    status = Status.ERR_CAPACITY


class NotSupportedError(ResaError):
    status = Status.ERR_NOT_SUPPORTED


class NoDeviceError(ResaError):
    status = Status.ERR_NO_DEVICE


class BackendError(ResaError):
    status = Status.ERR_BACKEND


class VersionMismatchError(ResaError):
    status = Status.ERR_VERSION_MISMATCH


class InternalError(ResaError):
    status = Status.ERR_INTERNAL


class ContextClosedError(BadStateError):
    """A call on a Context after close()."""

    def __init__(self, message="context is closed", status=None):
        super().__init__(message, status)


_BY_STATUS = {cls.status: cls for cls in (
    InvalidArgumentError, BadStateError, OutOfMemoryError, DeviceOutOfMemoryError,
    CapacityError, NotSupportedError, NoDeviceError, BackendError, VersionMismatchError,
    InternalError)}


def error_for(status, message):
    """The exception for a non-OK status (ResaError itself for an unknown one)."""
    cls = _BY_STATUS.get(status, ResaError)
    return cls(message, status)


def check(status, handle):
    """Raises the exception of a failed call on context `handle` (a c_void_p
    or None), with the context's last-error text; the status's own text when
    the library left none."""
    if status == 0:
        return
    text = lib.resa_ctx_last_error(handle) if handle else None
    message = text.decode("utf-8", "replace") if text else ""
    if not message:
        message = lib.resa_status_string(status).decode("utf-8", "replace")
    raise error_for(status, message)
