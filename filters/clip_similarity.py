"""CLIP image-text similarity over batches of decoded images (the pipeline's hot model stage).

`ClipScorer` loads an open_clip model through open_clip's own loaders and scores (image, caption)
pairs: cosine similarity of the L2-normalised image and text embeddings, as LAION did. The image
embedding is returned too, so the NSFW head (filters/nsfw.py) reuses it without a second pass.

Model specs (`ClipScorer.from_spec`):

    "ViT-B-32:openai"             built-in architecture + pretrained tag; the weight file is looked up
                                  in the local caches only (HF hub cache, then open_clip's URL cache):
                                  nothing is downloaded. Missing -> ModelLoadError (use local-dir:).
    "ViT-B-32:random"             built-in architecture, random weights (benchmarks only)
    "local-dir:/path"             open_clip's folder schema: open_clip_config.json + weights
                                  (open_clip_model.safetensors preferred), loaded by open_clip itself
    "hf-hub:org/repo"             a HF hub repo, resolved from the local HF cache only

Preprocessing is kiln's own, batched, from uint8 arrays (HxWx3, RGB or BGR): per image one
center crop + one cv2 resize to the model's input size (INTER_AREA when shrinking, cubic/linear when
enlarging), run in a thread pool (cv2 releases the GIL) while the previous batch is encoded; the
stacked uint8 batch goes to the device as uint8 and is normalised there with the model's mean/std.
It tracks open_clip's own PIL pipeline (shortest-side bicubic resize + center crop) to within about
0.01 cosine similarity (tested), at a fraction of the cost.

A model that cannot be loaded -- an unknown architecture or tag, weights not on this machine, a
local-dir: folder without its files, a weight file that is truncated, not a checkpoint, a pickle that
carries code, or of other shapes than the architecture -- raises `filters.errors.ModelLoadError` (a
ValueError): one line naming --clip-model, the spec, what is wrong and what to do.

This module imports nothing from `pipeline/`. Callers run `pipeline.compat.ensure_torch_compat()`
before constructing a scorer (open_clip imports torchvision).
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from filters.errors import ModelLoadError
from filters.passes import PASS_ROWS, fill, groups_by_width
from filters.weights import CONVERT_PICKLE, check_safetensors, pickle_refusal, sha256_file, short

__all__ = ["FLAG", "ClipScorer", "ClipScores", "ModelLoadError", "preprocess_images", "sha256_file"]

# The HF hub file names open_clip uses (open_clip.constants)
_HF_SAFE_WEIGHTS = "open_clip_model.safetensors"
_HF_WEIGHTS = "open_clip_pytorch_model.bin"
_RANDOM_TAGS = ("random", "none")
FLAG = "--clip-model"
_TODO = ("pass --clip-model local-dir:DIR (a folder with open_clip_config.json and open_clip_model.safetensors, "
         "e.g. an open_clip hf-hub repo downloaded on a machine with network), or --clip off")


@dataclass
class ClipScores:
    similarity: np.ndarray  # float32 [n]: cosine(image_emb, text_emb)
    image_embedding: np.ndarray  # float32 [n, d], L2-normalised


# --------------------------------------------------------------------------------------------
# Preprocessing

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_prefetch: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="kiln-clip-pre")
        return _pool


def _prefetcher() -> ThreadPoolExecutor:
    global _prefetch
    with _pool_lock:
        if _prefetch is None:
            _prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-clip-prefetch")
        return _prefetch


def _as_hwc3(img) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise TypeError(f"images must be uint8 arrays, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"images must be HxWx3 uint8 arrays, got shape {a.shape}")
    return a


def _resize(a: np.ndarray, w: int, h: int, interpolation: str) -> np.ndarray:
    if a.shape[1] == w and a.shape[0] == h:
        return a
    if w <= a.shape[1] and h <= a.shape[0]:
        flag = cv2.INTER_AREA  # antialiased shrink, close to PIL's bicubic with support scaling
    else:
        flag = cv2.INTER_LINEAR if interpolation == "bilinear" else cv2.INTER_CUBIC
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return cv2.resize(a, (w, h), interpolation=flag)


def _fit_one(img, size: int, resize_mode: str, interpolation: str, fill: int, bgr: bool, out: np.ndarray) -> None:
    a = _as_hwc3(img)
    h, w = a.shape[:2]
    if resize_mode == "shortest":
        # open_clip (torchvision Resize(size) + CenterCrop(size)) with its exact geometry: longer side
        # int(size * long / short), crop offset round((L - size) / 2). Cropping the square in source
        # pixels first would resize fewer pixels, but its sub-pixel offset moves shapes across patch
        # borders: small models then differ from open_clip's scores by up to ~0.07 (measured).
        if h == w:
            r = _resize(a, size, size, interpolation)
        else:
            nw, nh = (size, int(size * h / w)) if w < h else (int(size * w / h), size)
            r = _resize(a, nw, nh, interpolation)
            top, left = round((nh - size) / 2.0), round((nw - size) / 2.0)
            r = r[top : top + size, left : left + size]
    elif resize_mode == "squash":
        r = _resize(a, size, size, interpolation)
    elif resize_mode == "longest":
        scale = size / max(h, w)
        nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
        small = _resize(a, nw, nh, interpolation)
        r = np.full((size, size, 3), fill, dtype=np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        r[top : top + nh, left : left + nw] = small
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r}")
    out[...] = r[:, :, ::-1] if bgr else r


def preprocess_images(
    images: Sequence,
    size: int,
    *,
    channel_order: str = "rgb",
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 HxWx3 arrays -> one uint8 [n, size, size, 3] RGB batch (center crop + resize).

    `channel_order="bgr"` for OpenCV-decoded arrays. Runs in a thread pool (cv2 releases the GIL).
    """
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    n = len(images)
    if out is None:
        out = np.empty((n, size, size, 3), dtype=np.uint8)
    bgr = channel_order == "bgr"
    if n <= 2:
        for i, img in enumerate(images):
            _fit_one(img, size, resize_mode, interpolation, fill_color, bgr, out[i])
        return out
    futures = [_workers().submit(_fit_one, img, size, resize_mode, interpolation, fill_color, bgr, out[i]) for i, img in enumerate(images)]
    for f in futures:
        f.result()
    return out


# --------------------------------------------------------------------------------------------
# Model loading


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _hf_local(repo_id: str, filenames: Sequence[str], cache_dir: str | None, tried: list[str]) -> str | None:
    """The first of `filenames` present in the local HF cache for `repo_id`; never downloads."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        tried.append("huggingface_hub not installed")
        return None
    for fn in filenames:
        try:
            return hf_hub_download(repo_id=repo_id, filename=fn, cache_dir=cache_dir, local_files_only=True)
        except (OSError, ValueError):  # LocalEntryNotFoundError (an OSError), a malformed repo id: try the next name
            tried.append(f"hf-hub cache {repo_id}/{fn}")
    return None


def _resolve_tag_file(name: str, tag: str, cache_dir: str | None) -> tuple[str, dict]:
    """(local weight file, pretrained cfg) for a built-in name + pretrained tag, from caches only."""
    import open_clip

    spec = f"{name}:{tag}"
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelLoadError(FLAG, spec, f"unknown pretrained tag {tag!r} for open_clip model {name!r} (known tags: "
                             f"{', '.join(tags) or 'none'})", "use a known tag, or " + _TODO)
    if cfg.get("file"):
        return cfg["file"], cfg
    tried: list[str] = []
    hub = cfg.get("hf_hub", "")
    repo_id = ""
    if hub:
        repo_id, filename = os.path.split(hub)
        if not filename:
            names = [_HF_SAFE_WEIGHTS, _HF_WEIGHTS]
        elif filename.endswith((".bin", ".pth")):
            names = [filename[:-4] + ".safetensors", filename]
        else:
            names = [filename]
        found = _hf_local(repo_id, names, cache_dir, tried)
        if found:
            return found, cfg
    url = cfg.get("url", "")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path, cfg
        tried.append(path)
    fetch = (f"download them with `huggingface-cli download {repo_id}` on a machine with network (into the Hugging Face "
             "cache this machine reads: HF_HOME)" if repo_id else f"download {url} into ~/.cache/clip")
    raise ModelLoadError(
        FLAG, spec, f"its weights are not on this machine (looked for {len(tried)} files in the Hugging Face and "
        "open_clip caches) and kiln never downloads weights at run time", f"{fetch}, or {_TODO}")


def _check_open_clip_dir(local: Path, spec: str) -> str:
    """The weight file of an open_clip folder, after checking its config (ModelLoadError if unusable)."""
    if not local.is_dir():
        raise ModelLoadError(FLAG, spec, f"{local} does not exist" if not local.exists() else f"{local} is not a folder",
                             _TODO)
    cfg_path = local / "open_clip_config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(FLAG, spec, f"no open_clip_config.json in {local}", _TODO)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(FLAG, spec, f"{cfg_path} is not JSON ({short(err, 80)})", _TODO) from err
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise ModelLoadError(FLAG, spec, f"{cfg_path} has no 'model_cfg' object (not an open_clip config)", _TODO)
    weights = _local_dir_checkpoint(local)
    if weights is None:
        # open_clip would only warn and hand back random weights: refuse instead.
        raise ModelLoadError(FLAG, spec, f"no weight file (open_clip_model.safetensors, ...) in {local}", _TODO)
    return weights


def _weights_error(err: BaseException, spec: str, weights_file: str | None) -> ModelLoadError | None:
    """The ModelLoadError for what open_clip's checkpoint loading raised about the weight FILE, or None
    (then it is not about the file: the caller re-raises it)."""
    from safetensors import SafetensorError

    what = f"the weight file {weights_file}" if weights_file else "the weights"
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        code = pickle_refusal(err)
        if code:
            return ModelLoadError(FLAG, spec, f"{what} is a pickle that carries code ({code}) and is refused because "
                                  "loading it could run that code", f"if you trust the file, convert it to safetensors "
                                  f"on that machine: {CONVERT_PICKLE}; then point --clip-model at it, or {_TODO}")
        return ModelLoadError(FLAG, spec, f"{what} is not a PyTorch checkpoint (torch.load: {short(err, 80)})", _TODO)
    if isinstance(err, SafetensorError | EOFError):
        return ModelLoadError(FLAG, spec, f"{what} is truncated or not a checkpoint ({short(err, 100)})",
                              "copy it again, or " + _TODO)
    if isinstance(err, OSError):
        return ModelLoadError(FLAG, spec, f"{what} cannot be read ({err.strerror or short(err, 100)})", _TODO)
    if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in text:  # load_state_dict(strict=True)
        lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        return ModelLoadError(FLAG, spec, f"{what} does not fit the architecture ({detail[:200]})",
                              "pair the weights with their architecture, or " + _TODO)
    if isinstance(err, RuntimeError) and any(s in text for s in ("PytorchStreamReader", "zip archive", "Invalid magic")):
        return ModelLoadError(FLAG, spec, f"{what} is truncated or not a PyTorch checkpoint ({short(err, 100)})",
                              "copy it again, or " + _TODO)
    return None


def _local_dir_checkpoint(path: Path) -> str | None:
    """The weight file open_clip's local-dir loader picks in `path`."""
    try:
        from open_clip.factory import _find_checkpoint_in_dir

        return _find_checkpoint_in_dir(path)
    except ImportError:  # pragma: no cover - older/newer open_clip layouts
        for fn in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin"):
            if (path / fn).is_file():
                return str(path / fn)
        return None


class ClipScorer:
    """Batched CLIP image/text embedding and image-text cosine similarity.

    `model`: an open_clip built-in name ("ViT-B-32"), or a "local-dir:/path" / "hf-hub:org/repo"
    spec (then `pretrained` is ignored). `pretrained`: a tag ("openai", "laion2b_s32b_b82k"),
    resolved from local caches only, or None for random weights. `weights_path`: a weight file to
    load into the built-in architecture instead (a known `pretrained` tag still supplies its
    preprocessing and QuickGELU settings). Weights load from safetensors or with weights_only=True.
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        device: str | torch.device | None = None,
        batch_size: int = 64,
        weights_path: str | None = None,
        *,
        cache_dir: str | None = None,
        spec: str | None = None,
    ):
        import open_clip

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = _device(device)
        self.batch_size = int(batch_size)
        if pretrained is not None and pretrained.lower() in _RANDOM_TAGS:
            pretrained = None

        weights_file: str | None = None
        name = model
        user_spec = spec or (model if model.startswith(("local-dir:", "hf-hub:")) else f"{model}:{pretrained or 'random'}")
        if model.startswith(("local-dir:", "hf-hub:")):
            if model.startswith("hf-hub:"):
                repo_id = model[len("hf-hub:") :]
                tried: list[str] = []
                cfg_file = _hf_local(repo_id, ["open_clip_config.json"], cache_dir, tried)
                if cfg_file is None:
                    raise ModelLoadError(
                        FLAG, user_spec, "not in the local Hugging Face cache, and kiln never downloads weights at run "
                        f"time", f"download it with `huggingface-cli download {repo_id}` on a machine with network (into "
                        f"the cache this machine reads: HF_HOME), or {_TODO}")
                _hf_local(repo_id, [_HF_SAFE_WEIGHTS, _HF_WEIGHTS], cache_dir, tried)  # make sure it sits beside the config
                local = Path(cfg_file).parent
                name = repo_id
            else:
                local = Path(model[len("local-dir:") :]).expanduser().resolve()
                name = local.name
                model = f"local-dir:{local}"
            weights_file = _check_open_clip_dir(local, user_spec)
            if weights_file.endswith(".safetensors"):
                check_safetensors(weights_file, FLAG, user_spec, f"the weight file {weights_file}", _TODO)
            open_clip_id = f"local-dir:{local}"
            try:
                self.model = open_clip.create_model(open_clip_id, device=self.device, weights_only=True)
            except (pickle.UnpicklingError, EOFError, OSError, RuntimeError) as err:
                raise _weights_error(err, user_spec, weights_file) or err
            self.tokenizer = open_clip.get_tokenizer(open_clip_id)
            pretrained = None
        else:
            if model not in open_clip.list_models():
                close = difflib.get_close_matches(model, open_clip.list_models(), n=3, cutoff=0.6)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ModelLoadError(FLAG, user_spec, f"{model!r} is not an open_clip architecture{hint}",
                                     "use a name from open_clip.list_models() with a tag (e.g. ViT-B-32:openai), or " + _TODO)
            tag_cfg: dict = {}
            if weights_path is not None:
                weights_file = str(weights_path)
                if pretrained:  # a known tag still supplies its preprocessing and QuickGELU settings
                    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
            elif pretrained and os.path.isfile(pretrained):
                weights_file = pretrained
            elif pretrained:
                weights_file, tag_cfg = _resolve_tag_file(model, pretrained, cache_dir)
            if weights_file is not None and not os.path.isfile(weights_file):
                raise ModelLoadError(FLAG, user_spec, f"the weight file {weights_file} does not exist", _TODO)
            if weights_file is not None and weights_file.endswith(".safetensors"):
                check_safetensors(weights_file, FLAG, user_spec, f"the weight file {weights_file}", _TODO)
            force_pp = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if tag_cfg.get(k)}
            try:
                self.model = open_clip.create_model(
                    model,
                    pretrained=weights_file,
                    device=self.device,
                    force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                    force_preprocess_cfg=force_pp or None,
                    weights_only=True,
                    cache_dir=cache_dir,
                )
            except (pickle.UnpicklingError, EOFError, OSError, RuntimeError) as err:
                raise _weights_error(err, user_spec, weights_file) or err
            self.tokenizer = open_clip.get_tokenizer(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

        self.spec = spec or (model if model.startswith(("local-dir:", "hf-hub:")) else f"{model}:{pretrained or 'random'}")
        self.name = name
        self.pretrained = pretrained
        self.weights_path = os.path.realpath(weights_file) if weights_file else None
        self._sha256: str | None = None

        pp = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        size = getattr(self.model.visual, "image_size", pp.get("size", 224))
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ValueError(f"non-square model input {size} is not supported")
            size = size[0]
        self.image_size = int(size)
        self.resize_mode = pp.get("resize_mode", "shortest")
        self.interpolation = pp.get("interpolation", "bicubic")
        self.fill_color = int(pp.get("fill_color", 0))
        mean = torch.tensor(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)), dtype=torch.float32)
        std = torch.tensor(pp.get("std", (0.26862954, 0.26130258, 0.27577711)), dtype=torch.float32)
        # x_norm = (x/255 - mean)/std = x * scale + bias, applied per channel in one fused op
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self._bias = (-mean / std).view(1, 3, 1, 1).to(self.device)
        self.mean, self.std = tuple(mean.tolist()), tuple(std.tolist())
        self.embed_dim = int(self._probe_embed_dim())
        self._trim_text = self._can_trim_text()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: str, **kw) -> ClipScorer:
        """"Name:tag" | "Name:random" | "local-dir:/path" | "hf-hub:org/repo" (see module docstring)."""
        spec = spec.strip()
        if spec.startswith(("local-dir:", "hf-hub:")):
            return cls(model=spec, pretrained=None, **kw)
        if ":" not in spec:
            raise ModelLoadError(
                FLAG, spec, "names no weights: use 'Name:tag' (e.g. 'ViT-L-14:laion2b_s32b_b82k'), 'local-dir:/path', "
                "'hf-hub:org/repo', or 'Name:random' for random weights", "fix the flag, or pass --clip off")
        name, tag = spec.split(":", 1)
        return cls(model=name, pretrained=tag, spec=spec, **kw)

    def _probe_embed_dim(self) -> int:
        proj = getattr(self.model.visual, "proj", None)
        if isinstance(proj, torch.Tensor):
            return proj.shape[1]
        dim = getattr(self.model.visual, "output_dim", None)
        if dim:
            return int(dim)
        with torch.inference_mode():
            x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            return self.model.encode_image(x).shape[-1]

    @property
    def sha256(self) -> str | None:
        if self._sha256 is None and self.weights_path:
            self._sha256 = sha256_file(self.weights_path)
        return self._sha256

    @property
    def source(self) -> dict:
        """What the run's stats and card record about this model."""
        return {
            "spec": self.spec,
            "name": self.name,
            "pretrained": self.pretrained,
            "weights_path": self.weights_path,
            "sha256": self.sha256,
        }

    # -- encoding ------------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def preprocess(self, images: Sequence, channel_order: str = "rgb") -> np.ndarray:
        """uint8 [n, S, S, 3] RGB batch at the model's input size."""
        return preprocess_images(
            images,
            self.image_size,
            channel_order=channel_order,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
            fill_color=self.fill_color,
        )

    def _to_input(self, batch_u8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch_u8).to(self.device, non_blocking=True)  # NHWC uint8: 4x less to move
        x = x.permute(0, 3, 1, 2).float()  # NCHW view, channels_last strides
        return torch.addcmul(self._bias, x, self._scale)

    def encode_images(self, images: Sequence, channel_order: str = "rgb") -> np.ndarray:
        """float32 [n, d] L2-normalised image embeddings of uint8 HxWx3 arrays."""
        n = len(images)
        out = np.empty((n, self.embed_dim), dtype=np.float32)
        if n == 0:
            return out
        bs = self.batch_size
        starts = list(range(0, n, bs))
        pre = _prefetcher()
        nxt = pre.submit(self.preprocess, images[starts[0] : starts[0] + bs], channel_order)
        with torch.inference_mode(), self._autocast():
            for k, s in enumerate(starts):
                batch = nxt.result()
                if k + 1 < len(starts):
                    s2 = starts[k + 1]
                    nxt = pre.submit(self.preprocess, images[s2 : s2 + bs], channel_order)
                # Passes of exactly PASS_ROWS images, so an image's embedding does not depend on
                # which or how many others share its pass (filters.passes); batch_size is how many
                # images are preprocessed at a time, overlapping the previous chunk's passes.
                for j in range(0, len(batch), PASS_ROWS):
                    part = batch[j : j + PASS_ROWS]
                    feats = self.model.encode_image(self._to_input(fill(part, PASS_ROWS)))
                    out[s + j : s + j + len(part)] = F.normalize(feats.float(), dim=-1).cpu().numpy()[: len(part)]
        return out

    def _can_trim_text(self) -> bool:
        """True for open_clip's standard CLIP text tower: causal mask + EOT (argmax) pooling.

        There a token attends only to earlier ones and only the EOT position is read, so the
        padding after the longest caption's EOT cannot change the result: encoding
        tokens[:, :L] is the same computation as encoding all `context_length` positions.
        """
        m = self.model
        return (
            type(m).__name__ == "CLIP"
            and getattr(m, "text_pool_type", None) == "argmax"
            and isinstance(getattr(m, "attn_mask", None), torch.Tensor)
            and isinstance(getattr(m, "positional_embedding", None), torch.Tensor)
            and hasattr(m, "token_embedding")
            and hasattr(m, "ln_final")
        )

    def _encode_tokens(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """Text embeddings of `tokens`, computed over their first `length` positions (every EOT
        within them) when the tower can be trimmed, else over all context positions."""
        m = self.model
        if not self._trim_text:
            return m.encode_text(tokens)
        t = tokens[:, :length]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(t).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), t.argmax(dim=-1)]
        proj = m.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return x

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [n, d] L2-normalised text embeddings (captions truncated to the context length).

        Captions are tokenised once and (for standard CLIP text towers) encoded over a width set
        by their own token count instead of all context positions, in passes that never mix widths
        and hold exactly PASS_ROWS rows: a caption's embedding depends on it and the model alone
        (filters.passes).
        """
        from embed.batching import pad_width

        n = len(texts)
        out = np.empty((n, self.embed_dim), dtype=np.float32)
        if n == 0:
            return out
        tokens = self.tokenizer(["" if t is None else str(t) for t in texts])
        context = tokens.shape[1]
        if self._trim_text:
            widths = [pad_width(int(eot) + 1, context) for eot in tokens.argmax(dim=-1)]
        else:
            widths = [context] * n
        with torch.inference_mode(), self._autocast():
            for width, members in groups_by_width(widths):
                for s in range(0, len(members), PASS_ROWS):
                    idx = members[s : s + PASS_ROWS]
                    feats = self._encode_tokens(fill(tokens[idx], PASS_ROWS).to(self.device), width)
                    out[idx] = F.normalize(feats.float(), dim=-1).cpu().numpy()[: len(idx)]
        return out

    def score(self, images: Sequence, texts: Sequence[str], channel_order: str = "rgb") -> ClipScores:
        """Cosine similarity of each image with its own caption, and the image embeddings."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        img = self.encode_images(images, channel_order=channel_order)
        txt = self.encode_texts(texts)
        sim = np.einsum("nd,nd->n", img, txt).astype(np.float32)
        return ClipScores(similarity=sim, image_embedding=img)

    def __repr__(self) -> str:
        return f"ClipScorer(spec={self.spec!r}, device={self.device}, embed_dim={self.embed_dim}, image_size={self.image_size})"
