"""Writing a file so that a reader (or a crash) sees the old file or the new one, never a part of it."""
from __future__ import annotations

import contextlib
import os


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
