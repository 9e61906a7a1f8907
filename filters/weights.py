"""Reading weight files for filters/, with every failure of the FILE as one `ModelLoadError` line.

`load_torch` is `torch.load(weights_only=True)`; `load_safetensors` reads a safetensors file and its
metadata. What can be wrong with a file the user named -- missing, unreadable, not a checkpoint at
all, truncated, or a pickle that carries code (refused: loading it could run that code) -- becomes
a ModelLoadError naming the flag, the file, the problem and what to do. Only those specific
library errors are caught (OSError, pickle.UnpicklingError, EOFError, safetensors' SafetensorError,
torch's zip-reader RuntimeError); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re

from filters.errors import ModelLoadError

__all__ = ["CONVERT_PICKLE", "load_safetensors", "load_torch", "pickle_refusal", "sha256_file", "short"]

# How to turn a trusted pickle checkpoint into safetensors (printed in the refusal).
CONVERT_PICKLE = (
    "python -c \"import sys, torch, safetensors.torch as st; "
    "sd = torch.load(sys.argv[1], weights_only=False); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])\" IN.pt OUT.safetensors"
)
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
# Any other refusal of torch's weights_only unpickler (an opcode or construct outside plain tensors).
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.+)")
# torch.load's own RuntimeErrors about the file's bytes (truncated or corrupt zip archive, bad magic).
_TORCH_FILE_ERRORS = ("PytorchStreamReader", "zip archive", "Invalid magic number", "corrupt", "failed finding central directory")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in 1 MiB blocks: kiln's one file-hash helper (the model loaders,
    `kiln models fetch` / `verify`, the provenance in stats.json and the card all use it)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def short(err: BaseException, limit: int = 160) -> str:
    """The first line of an error message, cut to `limit` characters, for a one-line report."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pickle_refusal(err: BaseException) -> str | None:
    """The code-carrying global torch's weights_only unpickler refused (e.g. "__main__.Head"), if any."""
    m = _GLOBAL.search(str(err))
    if m:
        return m.group(1)
    m = _UNPICKLER.search(str(err))
    return m.group(1).strip().rstrip(".") if m else None


def _unreadable(flag: str, spec: str, what: str, err: OSError, todo: str) -> ModelLoadError:
    if isinstance(err, FileNotFoundError):
        problem = f"{what} does not exist"
    elif isinstance(err, IsADirectoryError):
        problem = f"{what} is a folder, not a file"
    else:
        problem = f"{what} cannot be read ({err.strerror or short(err)})"
    return ModelLoadError(flag, spec, problem, todo)


def load_torch(path: str | os.PathLike, flag: str, spec: str, what: str, todo: str, convert: str | None = None):
    """`torch.load(path, map_location="cpu", weights_only=True)`; a bad file -> ModelLoadError.

    `what` names the file in the message ("the NSFW head"); `todo` ends every message ("pass --nsfw
    off"); `convert` is what to do with a pickle that carries code (default: CONVERT_PICKLE)."""
    import pickle

    import torch

    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about a pickle protocol it then refuses anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        code = pickle_refusal(err)
        if code:
            raise ModelLoadError(
                flag, spec,
                (f"{what} is a pickle that carries code ({code}) and is refused because loading it could run that code"
                 if _GLOBAL.search(str(err)) else
                 f"{what} is a pickle that torch's safe loader refuses ({code}): it may carry code, and loading it "
                 f"could run that code"),
                f"if you trust the file, convert it to safetensors on that machine: {convert or CONVERT_PICKLE}; "
                f"then pass the .safetensors file, or {todo}",
            ) from err
        raise ModelLoadError(flag, spec, f"{what} is not a PyTorch checkpoint (torch.load: {short(err, 80)})",
                             f"check the path, or {todo}") from err
    except EOFError as err:
        raise ModelLoadError(flag, spec, f"{what} is empty or truncated", f"copy it again, or {todo}") from err
    except OSError as err:
        raise _unreadable(flag, spec, what, err, todo) from err
    except RuntimeError as err:
        if not any(s in str(err) for s in _TORCH_FILE_ERRORS):
            raise
        raise ModelLoadError(flag, spec, f"{what} is truncated or not a PyTorch checkpoint ({short(err, 100)})",
                             f"copy it again, or {todo}") from err


def load_safetensors(path: str | os.PathLike, flag: str, spec: str, what: str, todo: str):
    """(state_dict on the CPU, metadata dict) of a safetensors file; a bad file -> ModelLoadError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except SafetensorError as err:
        raise ModelLoadError(flag, spec, f"{what} is truncated or not a safetensors file ({short(err, 100)})",
                             f"copy it again, or {todo}") from err
    except OSError as err:
        raise _unreadable(flag, spec, what, err, todo) from err
    return state_dict, meta


def check_safetensors(path: str | os.PathLike, flag: str, spec: str, what: str, todo: str) -> None:
    """Read only the header of a safetensors file (cheap): truncated or not one -> ModelLoadError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except SafetensorError as err:
        raise ModelLoadError(flag, spec, f"{what} is truncated or not a safetensors file ({short(err, 100)})",
                             f"copy it again, or {todo}") from err
    except OSError as err:
        raise _unreadable(flag, spec, what, err, todo) from err
