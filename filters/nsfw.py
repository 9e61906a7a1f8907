"""LAION's CLIP-embedding NSFW head: p(unsafe) from the CLIP image embedding ClipScorer already made.

Architecture: the MLP LAION published as `H14_NSFW_Detector` (LAION-AI/CLIP-based-NSFW-Detector,
`h14_nsfw_model.py`, weights `h14_nsfw.pth`; the same class is used by clip-retrieval's
`h14_nsfw_model.py` and NVIDIA NeMo-Curator's NsfwClassifier for ViT-H/14, input 1024):

    layers = Sequential(
        0  Linear(d, 1024), 1 ReLU, 2 Dropout(0.2),
        3  Linear(1024, 2048), 4 ReLU, 5 Dropout(0.2),
        6  Linear(2048, 1024), 7 ReLU, 8 Dropout(0.2),
        9  Linear(1024, 256), 10 ReLU, 11 Dropout(0.2),
        12 Linear(256, 128), 13 ReLU, 14 Dropout(0.2),
        15 Linear(128, 16),
        16 Linear(16, 1))

so its state_dict keys are `layers.{0,3,6,9,12,15,16}.{weight,bias}` and `h14_nsfw.pth` (a plain
state_dict; load it with weights_only=True, or convert it to safetensors) loads as is. The input is
the L2-normalised CLIP image embedding (re-normalised here in float32, so float16-stored embeddings
are fine). LAION trained that head with MSELoss on 0/1 labels and uses the raw output as the score;
it has no sigmoid, so the default `activation="clamp"` clips the raw output to [0, 1] (monotone:
any threshold in (0, 1) selects the same rows as the raw score). Heads trained with a logit output
use `activation="sigmoid"`; a safetensors file may record its activation in its metadata
(`{"activation": "sigmoid"}`), which is used when the caller gives none.

A second layout, "keras_dense" (safetensors metadata `{"layout": "keras_dense", ...}`, or detected
from its `norm.*` / `dense.*` keys), holds LAION's original ViT-L/14 (768-d) and ViT-B/32 (512-d)
autokeras detectors (`clip_autokeras_binary_nsfw`, `clip_autokeras_nsfw_b32`, the models behind
LAION-5B's punsafe), converted by `python -m filters.nsfw_keras IN.zip OUT.safetensors` (see that
module for the published files' format). Its forward pass is Keras's:

    optional: x = float16(x)                      (metadata input_precision "float16")
    lookup:   x[:, c] = index of printf("%f", x[:, c]) in column c's vocabulary, 0 if absent
              (tensors lookup.columns, lookup.{j}.keys as float64 numbers, lookup.{j}.values)
    x = (x - norm.mean) / max(sqrt(norm.variance), norm_epsilon)      (Keras Normalization, eps 1e-7)
    x = relu(x @ dense.i.weight.T + dense.i.bias) for every dense layer but the last, which has no relu
    p = sigmoid(x)                                (metadata activation, default "sigmoid" here)

on the L2-normalised embedding. Width mismatches (a 768-d head fed 512-d ViT-B/32 embeddings) are
refused with a ValueError naming both widths, in both layouts.

A head file that cannot be used -- missing, not a checkpoint, truncated, a pickle that carries code,
another layout, another width than the CLIP model's -- raises `filters.errors.ModelLoadError` (a
ValueError): one line naming --nsfw-head, the file, what is wrong and what to do.

This module imports nothing from `pipeline/`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from filters.errors import ModelLoadError
from filters.passes import fill
from filters.weights import load_safetensors, load_torch, sha256_file

__all__ = ["FLAG", "KERAS_LAYOUT", "LAYOUT", "KerasDenseHead", "ModelLoadError", "NsfwHead", "NsfwScorer",
           "load_nsfw_state_dict"]

LAYOUT = "laion-h14-nsfw-mlp"
KERAS_LAYOUT = "keras_dense"
_PRECISIONS = ("float32", "float16")
_ACTIVATIONS = ("clamp", "sigmoid")
FLAG = "--nsfw-head"
_TODO = "pass LAION's NSFW head (h14_nsfw.pth layout) trained for your --clip-model, or --nsfw off"


class NsfwHead(nn.Module):
    """LAION's H14_NSFW_Detector MLP (see module docstring); forward returns the raw score [n, 1]."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.input_dim = int(input_dim)
        self.layers = nn.Sequential(
            nn.Linear(self.input_dim, 1024),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(1024, 2048),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(2048, 1024),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(1024, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KerasDenseHead(nn.Module):
    """Keras Normalization + Dense/ReLU stack ("keras_dense" layout); forward returns the logit [n, 1].

    The StringLookup columns (if any) are applied before this, in NsfwScorer.punsafe."""

    def __init__(self, mean: torch.Tensor, variance: torch.Tensor, dense: list[tuple[torch.Tensor, torch.Tensor]],
                 epsilon: float = 1e-7):
        super().__init__()
        self.register_buffer("mean", mean.float().reshape(-1))
        # Keras 2.8: (x - mean) / maximum(sqrt(variance), epsilon)
        self.register_buffer("denom", torch.clamp(torch.sqrt(variance.float().reshape(-1)), min=float(epsilon)))
        self.dense = nn.ModuleList()
        for w, b in dense:
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w.float())
                lin.bias.copy_(b.float())
            self.dense.append(lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.denom
        for i, lin in enumerate(self.dense):
            x = lin(x)
            if i < len(self.dense) - 1:
                x = torch.relu(x)
        return x


def _keras_head(sd: dict[str, torch.Tensor], meta: dict[str, str], path) -> tuple[KerasDenseHead, list, str]:
    """(head, [(column, {"%f" token: index})], input precision) of a keras_dense state_dict."""

    def bad(problem: str) -> ModelLoadError:
        return ModelLoadError(FLAG, path, f"the weights do not match the {KERAS_LAYOUT} NSFW head layout: {problem}",
                              "convert LAION's autokeras NSFW model with python -m filters.nsfw_keras, or " + _TODO)

    mean, variance = sd.get("norm.mean"), sd.get("norm.variance")
    if mean is None or variance is None or mean.ndim != 1 or variance.shape != mean.shape:
        raise bad("no 1-D 'norm.mean' / 'norm.variance' of one width")
    n_dense = 0
    while f"dense.{n_dense}.weight" in sd:
        n_dense += 1
    if not n_dense:
        raise bad("no 'dense.0.weight'")
    dense, width = [], mean.shape[0]
    for i in range(n_dense):
        w, b = sd[f"dense.{i}.weight"], sd.get(f"dense.{i}.bias")
        if w.ndim != 2 or w.shape[1] != width or b is None or b.shape != (w.shape[0],):
            raise bad(f"'dense.{i}.weight' {tuple(w.shape)} / bias {None if b is None else tuple(b.shape)} "
                      f"do not chain from width {width}")
        dense.append((w, b))
        width = w.shape[0]
    if width != 1:
        raise bad(f"the last dense layer has {width} outputs, not 1")
    lookups = []
    cols = sd.get("lookup.columns")
    if cols is not None:
        for j, col in enumerate(cols.reshape(-1).tolist()):
            keys, vals = sd.get(f"lookup.{j}.keys"), sd.get(f"lookup.{j}.values")
            if keys is None or vals is None or keys.shape != vals.shape or keys.ndim != 1 or not 0 <= col < mean.shape[0]:
                raise bad(f"lookup {j} (column {col}) has no matching 'lookup.{j}.keys' / 'lookup.{j}.values'")
            table = {"%f" % k: float(v) for k, v in zip(keys.double().tolist(), vals.tolist())}
            lookups.append((int(col), table))
    known = {"norm.mean", "norm.variance", "lookup.columns"} | {f"dense.{i}.{p}" for i in range(n_dense) for p in ("weight", "bias")}
    known |= {f"lookup.{j}.{p}" for j in range(len(lookups)) for p in ("keys", "values")}
    extra = sorted(set(sd) - known)
    if extra:
        raise bad(f"unexpected keys {extra[:4]}")
    try:
        eps = float(meta.get("norm_epsilon", "1e-07"))
    except ValueError:
        raise bad(f"metadata norm_epsilon {meta.get('norm_epsilon')!r} is not a number") from None
    precision = meta.get("input_precision", "float32")
    if precision not in _PRECISIONS:
        raise bad(f"metadata input_precision {precision!r} is not one of {_PRECISIONS}")
    return KerasDenseHead(mean, variance, dense, eps), lookups, precision


def load_nsfw_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict with `layers.N.*` keys, safetensors metadata or {}) from .safetensors or .pt/.pth/.bin.

    A file that is missing, not a checkpoint, truncated, or a pickle carrying code -> ModelLoadError."""
    path = str(path)
    meta: dict[str, str] = {}
    if path.endswith(".safetensors"):
        sd, meta = load_safetensors(path, FLAG, path, "the file", _TODO)
    else:
        sd = load_torch(path, FLAG, path, "the file", _TODO)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise ModelLoadError(FLAG, path, f"the file holds a {type(sd).__name__}, not a state_dict of tensors", _TODO)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if sd and all(k.split(".")[0].isdigit() for k in sd):  # a bare Sequential's state_dict
        sd = {f"layers.{k}": v for k, v in sd.items()}
    return sd, meta


class NsfwScorer:
    """p(unsafe) in [0, 1] per L2-normalised CLIP image embedding: LAION's H14 MLP or a keras_dense head."""

    def __init__(
        self,
        weights_path: str | os.PathLike,
        input_dim: int | None = None,
        device: str | torch.device | None = None,
        *,
        activation: str | None = None,
        batch_size: int = 64,  # rows per pass; every pass is filled to it (filters.passes)
    ):
        self.weights_path = os.path.realpath(str(weights_path))
        if not os.path.isfile(self.weights_path):
            what = "is a folder, not a weight file" if os.path.isdir(self.weights_path) else "does not exist"
            raise ModelLoadError(FLAG, weights_path, f"the file {what}", _TODO)
        sd, meta = load_nsfw_state_dict(self.weights_path)
        self._lookups: list = []
        self.input_precision = "float32"
        self.layout = LAYOUT
        keras_head = None
        if meta.get("layout") == KERAS_LAYOUT or (meta.get("layout") is None and "norm.mean" in sd):
            self.layout = KERAS_LAYOUT
            keras_head, self._lookups, self.input_precision = _keras_head(sd, meta, weights_path)
            file_dim = int(keras_head.mean.shape[0])
        elif meta.get("layout") not in (None, LAYOUT):
            raise ModelLoadError(FLAG, weights_path, f"its metadata names layout {meta.get('layout')!r}, "
                                 f"not {LAYOUT!r} or {KERAS_LAYOUT!r}", f"fix the file's metadata, or {_TODO}")
        else:
            first = sd.get("layers.0.weight")
            if first is None or first.ndim != 2:
                raise ModelLoadError(
                    FLAG, weights_path,
                    f"not a LAION H14-layout NSFW head (no 2-D 'layers.0.weight'; keys: {sorted(sd)[:4]})", _TODO)
            file_dim = int(first.shape[1])
        if input_dim is not None and int(input_dim) != file_dim:
            raise ModelLoadError(
                FLAG, weights_path, f"the head takes {file_dim}-d embeddings, but {input_dim}-d was requested", _TODO)
        self.input_dim = file_dim
        activation = activation or meta.get("activation") or ("sigmoid" if keras_head is not None else "clamp")
        if activation not in _ACTIVATIONS:
            if activation == meta.get("activation"):  # from the file's metadata, not from the caller
                raise ModelLoadError(FLAG, weights_path, f"its metadata names activation {activation!r}, "
                                     f"not one of {_ACTIVATIONS}", f"fix the file's metadata, or {_TODO}")
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)

        if keras_head is not None:
            head = keras_head
        else:
            head = NsfwHead(self.input_dim)
            try:
                head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
            except RuntimeError as e:  # load_state_dict: missing / unexpected keys, size mismatch
                detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3] if line.strip())
                raise ModelLoadError(
                    FLAG, weights_path,
                    f"the weights do not match the LAION H14 NSFW head layout ({LAYOUT}): {detail[:200]}", _TODO) from e
        self.model = head.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.weights_path)
        return self._sha256

    @property
    def source(self) -> dict:
        return {
            "weights_path": self.weights_path,
            "sha256": self.sha256,
            "input_dim": self.input_dim,
            "layout": self.layout,
            "activation": self.activation,
            **({"input_precision": self.input_precision} if self.layout == KERAS_LAYOUT else {}),
        }

    def check_compatible(self, embed_dim: int, clip_name: str | None = None) -> None:
        """ModelLoadError unless the CLIP model's embedding width (`clip_name`'s) is the head's input width."""
        if int(embed_dim) != self.input_dim:
            who = f"--clip-model {clip_name}" if clip_name else "the CLIP model"
            raise ModelLoadError(
                FLAG, self.weights_path,
                f"the NSFW head expects {self.input_dim}-d CLIP image embeddings but {who} produces {int(embed_dim)}-d embeddings",
                "pass the head trained for that CLIP model, or --nsfw off")

    def punsafe(self, image_embedding: np.ndarray) -> np.ndarray:
        """float32 [n] in [0, 1] from [n, d] CLIP image embeddings (float32 or float16)."""
        emb = np.asarray(image_embedding)
        if emb.ndim == 1:
            emb = emb[None, :]
        if emb.ndim != 2:
            raise ValueError(f"image_embedding must be [n, d], got shape {emb.shape}")
        if emb.shape[1] != self.input_dim:
            raise ValueError(
                f"NSFW head expects {self.input_dim}-d CLIP image embeddings but got {emb.shape[1]}-d embeddings"
            )
        n = emb.shape[0]
        out = np.empty(n, dtype=np.float32)
        if n == 0:
            return out
        with torch.inference_mode():
            for s in range(0, n, self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(emb[s : s + self.batch_size], dtype=np.float32)).to(self.device)
                rows = len(x)
                # Every pass holds exactly batch_size rows: a row's punsafe does not depend on which
                # or how many others share it (filters.passes).
                x = torch.nn.functional.normalize(fill(x, self.batch_size), dim=-1)
                if self.input_precision == "float16":
                    x = x.half().float()
                if self._lookups:
                    x = self._apply_lookups(x)
                raw = self.model(x)[:, 0].float()
                p = torch.sigmoid(raw) if self.activation == "sigmoid" else raw.clamp(0.0, 1.0)
                # Sliced last: an elementwise op's SIMD tail rounds differently (filters.passes).
                out[s : s + rows] = p.cpu().numpy()[:rows]
        return out

    def _apply_lookups(self, x: torch.Tensor) -> torch.Tensor:
        """keras_dense: each categorical column -> its vocabulary index of printf("%f", value), 0 if absent."""
        xn = x.cpu().numpy().copy()
        for col, table in self._lookups:
            tokens = np.char.mod("%f", xn[:, col].astype(np.float64))
            xn[:, col] = np.fromiter((table.get(t, 0.0) for t in tokens.tolist()), dtype=np.float32, count=len(xn))
        return torch.from_numpy(xn).to(x.device)

    def __repr__(self) -> str:
        return (f"NsfwScorer(input_dim={self.input_dim}, layout={self.layout!r}, activation={self.activation!r}, "
                f"weights={self.weights_path!r})")
