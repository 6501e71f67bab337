"""Writing files: atomically (a reader, or a crash, sees the old file or the new one, never a part of
it), and values as plain JSON."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Mapping

import numpy as np


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it over `path` (atomic on POSIX);
    a failed write removes the temporary file and leaves `path` as it was."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def jsonable(value):
    """`value` as plain JSON: arrays and tuples become lists, numpy scalars Python numbers, NaN and
    infinities null (JSON has none), mapping keys strings, and anything else its str."""
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, str) or value is None:
        return value
    return str(value)
