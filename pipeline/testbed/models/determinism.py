"""What makes a tiny-model build reproducible inside one process (pipeline.testbed.models.build
runs each build in a fresh interpreter with `BUILD_ENV`; the builders decorate themselves with
`reproducible`). Its own module so the builders and the build driver import it one way."""

from __future__ import annotations

import contextlib
import functools
import inspect
import random

# The synthetic webs the builders learn from are made with this base URL (nothing serves it): no
# free-port lottery can reach a build, even through the (URL, caption) uniqueness check.
SYNTH_BASE_URL = "http://127.0.0.1:9"

# Set before the interpreter starts, so that OpenMP, MKL and the tokenizers' Rust pool read them.
BUILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
    # MKL's conditional numerical reproducibility: results independent of buffer alignment.
    "MKL_CBWR": "AUTO,STRICT",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
    "CUDA_VISIBLE_DEVICES": "",  # builds are CPU builds, on a GPU machine too
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}


@contextlib.contextmanager
def deterministic(seed: int):
    """One torch thread, deterministic algorithms, every global RNG seeded; all restored afterwards."""
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    py_state, np_state = random.getstate(), np.random.get_state()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        random.setstate(py_state)
        np.random.set_state(np_state)


def reproducible(builder):
    """Run a builder, whose signature has a `seed` parameter, under `deterministic(seed)`."""
    signature = inspect.signature(builder)

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with deterministic(bound.arguments["seed"]):
            return builder(*args, **kwargs)

    return wrapper
