"""Make the pinned stack import cleanly on this kind of machine, before torch-based libraries load.

PyPI's torchvision 0.28 wheel is a CUDA build. On a CPU-only torch its `_C.so` cannot load, and
`import torchvision` then dies with "operator torchvision::nms does not exist" -- which also breaks
open_clip, timm and every transformers model class (transformers imports torchvision whenever it is
installed). When, and only when, the extension cannot load, we register the two op schemas
torchvision's Python side declares fake kernels for (nms, qnms). Nothing in kiln calls them.

Beam workers are fresh processes: every DoFn.setup that imports torch-based code calls
`ensure_torch_compat()` too.
"""

from __future__ import annotations

import logging
import os
import threading

_QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",  # weights never come from the hub at run time here
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations (via img2dataset) calls PyPI on import
    "WANDB_MODE": "disabled",  # img2dataset imports wandb at module import
    "TOKENIZERS_PARALLELISM": "false",
}

_lock = threading.Lock()
_done = False


class _DropBeamGcpNotice(logging.Filter):
    """Beam logs "apitools not found, and bigquery client libraries are not available" at WARNING
    whenever its GCP filesystem module is imported without the [gcp] extra: noise on every local
    run, and it would sit above a user's one-line error. kiln reads gs:// only where the extra is
    installed, which Beam then reports itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


def set_quiet_env() -> None:
    """Set the environment variables that keep imported libraries off the network (if unset), and
    drop Beam's GCP-extra notice."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger().addFilter(_DropBeamGcpNotice())


def ensure_torch_compat() -> None:
    """Idempotently register torchvision's missing op schemas if its C extension cannot load."""
    global _done
    set_quiet_env()
    if _done:
        return
    with _lock:
        if _done:
            return
        try:
            import importlib.util

            import torch
        except ImportError:  # torch-free use of kiln (e.g. the synthetic web) needs nothing
            _done = True
            return
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            _done = True
            return
        tv_dir = list(spec.submodule_search_locations)[0]
        so = next((os.path.join(tv_dir, f) for f in os.listdir(tv_dir) if f.startswith("_C") and f.endswith(".so")), None)
        try:
            if so is None:
                raise OSError("torchvision/_C.so not found")
            torch.ops.load_library(so)
        except (OSError, RuntimeError):
            lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - must stay alive
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            globals()["_torchvision_lib"] = lib
        _done = True
