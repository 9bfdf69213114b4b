"""Failures that GDAL reports without failing the call: recorded, so that a read can fail.

Some damage reaches Python only as a GDAL error message: a JPEG 2000 band cut short decodes
to zeros and garbage ("ERROR 1: Stream too short", "opj_get_decoded_tile() failed") while the
read returns success, and the decoding threads of the JP2 driver report from threads of
GDAL's own, where no per-call error context of rasterio sees it. So this module sets one
process-wide GDAL error handler (``CPLSetErrorHandler`` of the libgdal that rasterio uses,
called through ctypes; pyogrio may load another) that records each failure (``CE_Failure`` / ``CE_Fatal``) and passes
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
import threading
import warnings

CE_FAILURE, CE_FATAL = 3, 4

_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_char_p)
_lock = threading.Lock()
_messages: list[str] = []
_state: dict = {}  # "installed", "callback", "previous" (kept referenced: GDAL holds the pointers)


def _rasterio_gdal():
    """rasterio's libgdal, through one of rasterio's own extension modules: symbols looked up in
    its handle resolve in its dependencies, so this is the GDAL rasterio uses even where another
    package (pyogrio) has loaded a libgdal of its own."""
    import rasterio._base

    lib = ctypes.CDLL(rasterio._base.__file__)  # already loaded: the same handle
    try:
        lib.CPLSetErrorHandler  # noqa: B018 (resolves the symbol)
    except AttributeError:
        return None
    return lib


def install() -> bool:
    """Set the recording handler (once per process); False when libgdal cannot be found."""
    if "installed" in _state:
        return _state["installed"]
    with _lock:
        if "installed" in _state:
            return _state["installed"]
        lib = _rasterio_gdal()
        if lib is None:
            warnings.warn(
                "fastcon could not reach rasterio's libgdal: GDAL errors that do not fail a read "
                "(e.g. a truncated JPEG 2000 band) go undetected",
                RuntimeWarning,
                stacklevel=3,
            )
            _state["installed"] = False
            return False
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
