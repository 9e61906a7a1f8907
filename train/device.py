"""`--device` of `kiln train` / `kiln sample`, checked before any work (train.errors' one-line rule)."""

from __future__ import annotations

import torch

from train.errors import ConfigError

__all__ = ["check_device"]


def check_device(device: str | None) -> None:
    """--device names a torch device this machine has (None: cuda if available, else cpu)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r}: give a torch device such as cpu, cuda or cuda:1") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ConfigError(f"--device {device}: this machine has {n or 'no'} CUDA device(s); pass --device cpu, "
                              f"or leave --device out (cuda if available, else cpu)")
