"""Failures that GDAL reports without failing the call: recorded, so that a read can fail.

Some damage reaches Python only as a GDAL error message: a JPEG 2000 band cut short decodes
to zeros and garbage ("ERROR 1: Stream too short", "opj_get_decoded_tile() failed") while the
read returns success, and the decoding threads of the JP2 driver report from threads of
GDAL's own, where no per-call error context of rasterio sees it. So this module sets one
process-wide GDAL error handler (``CPLSetErrorHandler`` of the libgdal that rasterio loaded,
called through ctypes) that records each failure (``CE_Failure`` / ``CE_Fatal``) and passes
every message on to the handler that was there before (so GDAL still prints what it printed).

    start = gdal_errors.mark()
    ... rasterio reads ...
    messages = gdal_errors.since(start)   # the failures reported meanwhile, by any thread

Failures are counted per process: prepare's worker processes read one scene at a time, so a
failure recorded during a scene's reads belongs to that scene (``raster.SceneReader`` then
reads the files again one by one to name the damaged one).
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import warnings

CE_FAILURE, CE_FATAL = 3, 4

_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_char_p)
_lock = threading.Lock()
_messages: list[str] = []
_state: dict = {}  # "installed", "callback", "previous" (kept referenced: GDAL holds the pointers)


def _libgdal_path() -> str | None:
    """The libgdal that rasterio's extension modules are linked against (already loaded)."""
    import rasterio._base

    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if "/" in line else ""
                if os.path.basename(path).startswith("libgdal"):
                    return path
    except OSError:
        pass
    import rasterio

    here = os.path.dirname(os.path.dirname(rasterio.__file__))
    found = glob.glob(os.path.join(here, "rasterio.libs", "libgdal*")) + glob.glob(
        os.path.join(os.path.dirname(rasterio.__file__), ".dylibs", "libgdal*")
    )
    return found[0] if found else None


def install() -> bool:
    """Set the recording handler (once per process); False when libgdal cannot be found."""
    if "installed" in _state:
        return _state["installed"]
    with _lock:
        if "installed" in _state:
            return _state["installed"]
        path = _libgdal_path()
        if path is None:
            warnings.warn(
                "fastcon could not find rasterio's libgdal: GDAL errors that do not fail a read "
                "(e.g. a truncated JPEG 2000 band) go undetected",
                RuntimeWarning,
                stacklevel=3,
            )
            _state["installed"] = False
            return False
        lib = ctypes.CDLL(path)  # the loaded library: the same handle, the same handler state
        lib.CPLSetErrorHandler.restype = ctypes.c_void_p
        lib.CPLSetErrorHandler.argtypes = [_HANDLER]
        default = _HANDLER(ctypes.cast(lib.CPLDefaultErrorHandler, ctypes.c_void_p).value)

        def record(err_class, err_no, msg):
            text = msg.decode("utf-8", "replace").strip() if msg else ""
            if err_class >= CE_FAILURE:
                _messages.append(text)
            _state["previous"](err_class, err_no, msg)

        callback = _HANDLER(record)
        previous = lib.CPLSetErrorHandler(callback)
        _state.update(callback=callback, previous=_HANDLER(previous) if previous else default, installed=True)
        return True


def mark() -> int:
    """A position in this process's record of GDAL failures (installs the handler if needed)."""
    install()
    return len(_messages)


def since(start: int) -> list[str]:
    """GDAL's failure messages recorded after ``mark()`` returned ``start``, in order."""
    return _messages[start:]


def describe(messages: list[str], limit: int = 3) -> str:
    """Distinct messages, at most ``limit``, for an error text."""
    distinct = list(dict.fromkeys(m for m in messages if m))
    more = f" (+{len(distinct) - limit} more)" if len(distinct) > limit else ""
    return "GDAL reported: " + "; ".join(distinct[:limit]) + more
