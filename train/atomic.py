"""Every file kiln's trainer and sampler write appears atomically: written under a temporary name
beside its target, then renamed over it (os.replace), so a reader -- or a run resumed after Ctrl-C,
SIGTERM or a full disk -- never sees half a file, and no temporary file is left behind.

Standard library only (train.checkpoint re-exports it; train.grid uses it without safetensors)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "temp_name"]


def temp_name(path: Path) -> Path:
    """The temporary name `atomic_write` writes `path` under: hidden, beside it, unique."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write through `write(tmp)` to a temporary name beside `path`, then rename it over `path`.
    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
