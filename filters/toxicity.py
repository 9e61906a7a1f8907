"""Caption toxicity with Detoxify models: batched, deterministic, loadable with no network at all.

    scorer = ToxicityScorer("local:/models/detoxify-original")   # or "original" with a network
    result = scorer.score(captions)                            # ToxicityScores: labels + [n, k] float32
    keep = max_score(result, ["toxicity", "insult"]) <= 0.5

Model specs:

- ``"original"``, ``"unbiased"``, ``"multilingual"`` (and Detoxify's ``"original-small"``,
  ``"unbiased-small"``): Detoxify's published checkpoints. The checkpoint file comes from Detoxify's
  release URL (``detoxify.detoxify.MODEL_URLS``) into torch.hub's cache, exactly where
  ``Detoxify(model_type)`` puts it; the transformers config and tokenizer come from the Hugging
  Face hub under the checkpoint's ``model_type`` (e.g. ``bert-base-uncased``), as Detoxify does.
  With ``HF_HUB_OFFLINE`` set (kiln sets it) or no network, and nothing cached, this raises a
  ModelLoadError that says to pass ``local:DIR`` instead; it never falls back to anything silently.
- ``"local:/path/to/dir"``: a folder holding ``checkpoint.ckpt`` in Detoxify's format -- a
  torch-saved dict ``{"config": {"arch": {"args": {"model_type", "model_name", "tokenizer_name",
  "num_classes"}}, "dataset": {"args": {"classes": [...]}}}, "state_dict": {...}}`` -- or the same
  as ``checkpoint.safetensors`` (the state dict, with that config as JSON under the metadata key
  ``"detoxify_config"``), plus the transformers ``config.json`` and tokenizer files for its
  architecture. Nothing is fetched: the folder supplies the config and the tokenizer, and
  ``model_type`` is only informational. ``local:/path/to/file.ckpt`` names the checkpoint file
  itself (its folder holds the rest). A real Detoxify checkpoint becomes such a folder by saving
  ``AutoConfig``/``AutoTokenizer`` of its ``model_type`` next to it on a machine with a network.

Weights load with ``torch.load(weights_only=True)`` or safetensors only, never with pickle's full
power (Detoxify's own loader uses ``weights_only=False``). The output semantics are Detoxify's: the
tokenizer with truncation and padding, ``model(**inputs).logits``, a sigmoid per class, and class
names standardised with Detoxify's mapping (toxic -> toxicity, severe_toxic -> severe_toxicity,
identity_hate -> identity_attack).

A model that cannot be loaded -- an unknown name, a missing folder or file, a file that is not a
checkpoint or is truncated, a pickle that carries code, a config or tokenizer that is missing or
does not fit the weights -- raises ``filters.errors.ModelLoadError`` (a ValueError): one line
naming --toxicity-model, the spec, what is wrong and what to do.

This module imports nothing from ``pipeline/``. transformers is imported lazily by the loader; on
machines where PyPI's CUDA torchvision sits beside a CPU torch, the caller must first call
``pipeline.compat.ensure_torch_compat()`` (every Beam ``DoFn.setup`` and ``tests/conftest.py`` do).
"""

from __future__ import annotations

import http.client
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from filters.errors import ModelLoadError
from filters.weights import load_safetensors, load_torch, sha256_file, short

# The toxicity labels Detoxify's published models report, in their output order. A scorer's own
# `labels` (read from its checkpoint) are authoritative: the published "unbiased" checkpoint, for
# one, also outputs nine identity columns (male, female, ...) after these seven.
DETOXIFY_LABELS: dict[str, list[str]] = {
    "original": ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"],
    "unbiased": ["toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit"],
    "multilingual": ["toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit"],
}
DETOXIFY_LABELS["original-small"] = list(DETOXIFY_LABELS["original"])
DETOXIFY_LABELS["unbiased-small"] = list(DETOXIFY_LABELS["unbiased"])

# Detoxify standardises the Jigsaw column names its "original" checkpoints were trained with.
CLASS_NAME_MAP = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}

LOCAL_PREFIX = "local:"
CHECKPOINT_NAMES = ("checkpoint.ckpt", "checkpoint.safetensors")
SAFETENSORS_CONFIG_KEY = "detoxify_config"
MAX_TOKENS = 512
FLAG = "--toxicity-model"
_TODO = ("pass --toxicity-model local:DIR (a folder with Detoxify's checkpoint.ckpt plus the config.json and tokenizer "
         "of its model_type), or --toxicity off")
# Architectures whose position ids start after the padding index (max_position_embeddings 514 -> 512 tokens).
_OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer"}


@dataclass
class ToxicityScores:
    """Scores of a batch of captions: `scores[i, j]` is caption i's sigmoid score for `labels[j]`."""

    labels: list[str]
    scores: np.ndarray  # float32 [n, len(labels)], each in [0, 1]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def column(self, label: str) -> np.ndarray:
        return self.scores[:, _label_index(self.labels, label)]

    def as_dicts(self) -> list[dict[str, float]]:
        """One {label: score} dict per caption (Detoxify's predict() shape, transposed)."""
        return [dict(zip(self.labels, map(float, row))) for row in self.scores]


def max_score(scores: ToxicityScores, labels_subset: Iterable[str] | None = None) -> np.ndarray:
    """Per caption, the maximum score over `labels_subset` (all labels if None): float32 [n].

    The filter rejects a caption when this exceeds its threshold (`--max-toxicity`)."""
    chosen = list(scores.labels) if labels_subset is None else list(labels_subset)
    if not chosen:
        raise ValueError("labels_subset is empty")
    idx = [_label_index(scores.labels, name) for name in chosen]
    if scores.scores.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    return scores.scores[:, idx].max(axis=1).astype(np.float32, copy=False)


def _label_index(labels: Sequence[str], name: str) -> int:
    try:
        return list(labels).index(name)
    except ValueError:
        raise ValueError(f"unknown toxicity label {name!r}; this model has {list(labels)}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_help(name: str) -> str:
    return (
        "pass a local model instead: --toxicity-model local:/path/to/dir, a folder holding Detoxify's "
        "checkpoint.ckpt plus the transformers config.json and tokenizer files of its model_type "
        "(`python -m pipeline.testbed.models.toxicity DIR` builds a tiny one for tests and demos), or --toxicity off"
    )


class ToxicityScorer:
    """A Detoxify model in eval mode, scoring captions in batches (see the module docstring)."""

    def __init__(
        self, model: str = "original", device: str | None = "cpu", batch_size: int = 64, max_length: int | None = None
    ):
        """`device=None` picks CUDA when available, else the CPU (as the CLIP scorer does)."""
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_length is not None and max_length < 2:
            raise ValueError("max_length must be >= 2 (it counts the [CLS]/[SEP] tokens)")
        self.spec = model
        self.device = device
        self.batch_size = int(batch_size)
        if model.startswith(LOCAL_PREFIX):
            weights_path, loaded = _load_local_checkpoint(model[len(LOCAL_PREFIX) :], model)
            files_dir, local_only, kind = str(weights_path.parent), True, "local"
        elif model in DETOXIFY_LABELS:
            weights_path = _fetch_release_checkpoint(model)
            loaded = _load_torch_checkpoint(weights_path, model)
            files_dir, local_only, kind = None, _offline(), f"detoxify-{model}"
        else:
            raise ModelLoadError(
                FLAG, model, f"not a toxicity model: use one of {sorted(DETOXIFY_LABELS)} (Detoxify's published "
                f"checkpoints) or {LOCAL_PREFIX}/path/to/dir", "fix the flag, or pass --toxicity off")
        arch, class_names = _checkpoint_parts(loaded, weights_path, model)
        try:
            self.model, self.tokenizer = _build_model(arch, loaded["state_dict"], files_dir, local_only, model)
        except OSError as err:  # config/tokenizer missing; hub names: not cached and no network / offline
            if kind == "local":
                raise ModelLoadError(FLAG, model, f"cannot load the transformers config/tokenizer in {files_dir} "
                                     f"({short(err, 120)})", "put the config.json and tokenizer files of its "
                                     f"model_type ({arch['model_type']}) next to the checkpoint, or pass --toxicity off") from err
            raise ModelLoadError(
                FLAG, model, f"the transformers config/tokenizer of {arch['model_type']!r} are not in the local Hugging "
                f"Face cache ({short(err, 100)})", f"download them with `huggingface-cli download {arch['model_type']}` "
                f"on a machine with network, or " + _hub_help(model)) from err
        del loaded
        self.model.to(device)
        self.model.eval()
        self.labels: list[str] = class_names
        n_out = int(getattr(self.model.config, "num_labels", len(class_names)))
        if n_out != len(class_names):
            raise ModelLoadError(FLAG, model, f"the model in {weights_path} has {n_out} outputs but its checkpoint names "
                                 f"{len(class_names)} classes", _TODO)
        self.max_length = _max_length(self.model.config, self.tokenizer, max_length)
        self.source = {
            "name": model,
            "kind": kind,
            "weights_path": str(weights_path),
            "sha256": sha256_file(weights_path),
            "model_name": arch["model_name"],
            "model_type": arch["model_type"],
            "labels": list(self.labels),
            "max_length": self.max_length,
        }

    def score(self, captions: Sequence[str]) -> ToxicityScores:
        """Scores for `captions`, in order. Captions are truncated to `max_length` tokens. Each
        caption's scores depend on it and the model alone, not on the other captions (filters.passes):
        it is padded to a width set by its own token count, passes never mix widths, and every pass
        has exactly PASS_ROWS rows."""
        import torch

        from embed.batching import pad_width
        from filters.passes import PASS_ROWS, groups_by_width

        captions = list(captions)
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TypeError(f"caption {i} is {type(c).__name__}, not str")
        out = np.zeros((len(captions), len(self.labels)), dtype=np.float32)
        if not captions:
            return ToxicityScores(labels=list(self.labels), scores=out)
        enc = self.tokenizer(captions, truncation=True, max_length=self.max_length)  # unpadded id lists
        widths = [pad_width(len(ids), self.max_length) for ids in enc["input_ids"]]
        with torch.inference_mode():
            for width, members in groups_by_width(widths):
                for start in range(0, len(members), PASS_ROWS):
                    idx = members[start : start + PASS_ROWS]
                    rows = [{k: enc[k][i] for k in enc} for i in idx]
                    rows += [rows[0]] * (PASS_ROWS - len(rows))  # filler rows, dropped below
                    batch = self.tokenizer.pad(rows, padding="max_length", max_length=width, return_tensors="pt")
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    logits = self.model(**batch).logits
                    out[idx] = torch.sigmoid(logits.float()).cpu().numpy()[: len(idx)]  # sliced last (filters.passes)
        return ToxicityScores(labels=list(self.labels), scores=out)

    def __repr__(self) -> str:
        return f"ToxicityScorer({self.spec!r}, device={self.device!r}, labels={self.labels})"


# --------------------------------------------------------------------------------------------
# Saving


def save_detoxify_checkpoint(
    out_dir: str | Path,
    model,
    classes: Sequence[str],
    model_type: str,
    tokenizer=None,
    *,
    tokenizer_name: str | None = None,
    safetensors: bool = False,
    name: str = "kiln-detoxify",
) -> Path:
    """Write `model` (a transformers *ForSequenceClassification) as a folder `local:` loads:
    checkpoint.ckpt (or checkpoint.safetensors), config.json and, if given, the tokenizer files.
    `classes` are the checkpoint's class names (Jigsaw names are standardised on load). Returns
    the checkpoint path; the file is written under a temporary name, checked, then renamed."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    n_out = int(model.config.num_labels)
    if n_out != len(classes):
        raise ValueError(f"model has {n_out} outputs, {len(classes)} class names given")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        tokenizer_name = tokenizer_name or type(tokenizer).__name__
    if not tokenizer_name:
        raise ValueError("tokenizer_name is needed when no tokenizer is given")
    model.config.save_pretrained(str(out))
    config = {
        "name": name,
        "arch": {
            "type": name,
            "args": {
                "model_type": str(model_type),
                "model_name": type(model).__name__,
                "tokenizer_name": tokenizer_name,
                "num_classes": n_out,
            },
        },
        "dataset": {"type": name, "args": {"classes": classes}},
    }
    state_dict = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    final = out / CHECKPOINT_NAMES[1 if safetensors else 0]
    tmp = out / f".{final.name}.tmp"
    if safetensors:
        from safetensors.torch import save_file

        save_file(state_dict, str(tmp), metadata={SAFETENSORS_CONFIG_KEY: json.dumps(config, sort_keys=True)})
        _load_safetensors_checkpoint(tmp, f"{LOCAL_PREFIX}{out}")
    else:
        torch.save({"config": config, "state_dict": state_dict}, tmp)
        _load_torch_checkpoint(tmp, f"{LOCAL_PREFIX}{out}")  # the promise: loadable with weights_only=True
    os.replace(tmp, final)
    return final


# --------------------------------------------------------------------------------------------
# Loading


def _load_local_checkpoint(path_text: str, spec: str):
    path = Path(path_text).expanduser()
    if path.is_file():
        weights = path
    elif path.is_dir():
        weights = next((path / n for n in CHECKPOINT_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise ModelLoadError(FLAG, spec, f"the folder holds none of {list(CHECKPOINT_NAMES)} (a Detoxify-format "
                                 "checkpoint)", _TODO)
    else:
        raise ModelLoadError(FLAG, spec, f"{path} does not exist", _TODO)
    if weights.suffix == ".safetensors":
        return weights, _load_safetensors_checkpoint(weights, spec)
    return weights, _load_torch_checkpoint(weights, spec)


def _load_torch_checkpoint(path: Path, spec: str) -> dict:
    loaded = load_torch(path, FLAG, spec, f"the checkpoint {Path(path).name}", _TODO)
    if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
        raise ModelLoadError(FLAG, spec, f"{path} is not a Detoxify checkpoint (a dict with 'config' and 'state_dict')",
                             _TODO)
    return loaded


def _load_safetensors_checkpoint(path: Path, spec: str) -> dict:
    state_dict, meta = load_safetensors(path, FLAG, spec, f"the checkpoint {Path(path).name}", _TODO)
    if SAFETENSORS_CONFIG_KEY not in meta:
        raise ModelLoadError(FLAG, spec, f"{path} has no {SAFETENSORS_CONFIG_KEY!r} JSON in its safetensors metadata",
                             _TODO)
    try:
        config = json.loads(meta[SAFETENSORS_CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise ModelLoadError(FLAG, spec, f"the {SAFETENSORS_CONFIG_KEY!r} metadata of {path} is not JSON ({err})",
                             _TODO) from err
    return {"config": config, "state_dict": state_dict}


def _checkpoint_parts(loaded: dict, path: Path, spec: str) -> tuple[dict, list[str]]:
    def bad(problem: str) -> ModelLoadError:
        return ModelLoadError(FLAG, spec, f"{path}: {problem}", _TODO)

    try:
        arch = dict(loaded["config"]["arch"]["args"])
    except (KeyError, TypeError, ValueError) as err:
        raise bad(f"its config lacks arch.args ({err!r})") from None
    try:
        classes = list(loaded["config"]["dataset"]["args"]["classes"])
    except (KeyError, TypeError):
        # Detoxify's newer training configs keep the class names (and, for the unbiased models,
        # the identity classes that follow them in the output) in arch.args instead.
        if "classes" not in arch or not isinstance(arch["classes"], list | tuple) or not arch["classes"]:
            raise bad("its config names no classes (dataset.args.classes or arch.args.classes)") from None
        classes = list(arch["classes"]) + list(arch.get("identity_classes") or [])
    for key in ("model_type", "model_name", "tokenizer_name", "num_classes"):
        if key not in arch:
            raise bad(f"its config.arch.args lacks {key!r}")
    # Only sequence-classification models and tokenizers: the names index into transformers.
    if not re.fullmatch(r"[A-Za-z0-9]+ForSequenceClassification", str(arch["model_name"])):
        raise bad(f"unsupported model_name {arch['model_name']!r}")
    if not re.fullmatch(r"[A-Za-z0-9]+Tokenizer(Fast)?", str(arch["tokenizer_name"])):
        raise bad(f"unsupported tokenizer_name {arch['tokenizer_name']!r}")
    if not isinstance(arch["num_classes"], int) or arch["num_classes"] != len(classes):
        raise bad(f"num_classes {arch['num_classes']!r} != {len(classes)} class names")
    return arch, [CLASS_NAME_MAP.get(c, c) for c in classes]


def _import_transformers():
    try:
        import transformers
    except (RuntimeError, ImportError) as err:
        if "torchvision" in str(err):
            raise RuntimeError(
                "importing transformers failed on torchvision; call pipeline.compat.ensure_torch_compat() "
                f"before creating a ToxicityScorer ({err})"
            ) from err
        raise
    return transformers


def _torchvision_import_error() -> str | None:
    """The error `import torchvision` gives, if it is installed and fails (a CUDA wheel beside a CPU torch)."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - any failure is the diagnosis
        return f"{type(err).__name__}: {err}"
    return None


def _build_model(arch: dict, state_dict: dict, files_dir: str | None, local_only: bool, spec: str = ""):
    """Detoxify's get_model_and_tokenizer, with the config and tokenizer from `files_dir` when given.

    OSError: the config or tokenizer files are missing (or not cached); the caller says which."""
    transformers = _import_transformers()
    try:
        model_class = getattr(transformers, arch["model_name"])
        tokenizer_class = getattr(transformers, arch["tokenizer_name"])
    except (AttributeError, ImportError, RuntimeError) as err:
        broken = _torchvision_import_error()
        if broken:
            raise RuntimeError(
                "transformers' model classes cannot import because torchvision cannot "
                f"({broken}); call pipeline.compat.ensure_torch_compat() before creating a ToxicityScorer"
            ) from err
        raise ModelLoadError(FLAG, spec, f"its checkpoint names {arch['model_name']} / {arch['tokenizer_name']}, which "
                             f"this transformers does not have ({short(err, 100)})", _TODO) from err
    source = files_dir or arch["model_type"]
    where = files_dir or f"the Hugging Face cache of {arch['model_type']}"
    try:
        config = model_class.config_class.from_pretrained(source, num_labels=int(arch["num_classes"]), local_files_only=local_only)
    except json.JSONDecodeError as err:
        raise ModelLoadError(FLAG, spec, f"the config.json in {where} is not JSON ({err})", _TODO) from err
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report would print above the one-line error below
    try:
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=state_dict, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported (and refused) below, in one line
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    mismatched = [m[0] if isinstance(m, tuple | list) else m for m in info.get("mismatched_keys", ())]
    if missing or mismatched:
        raise ModelLoadError(
            FLAG, spec, f"its checkpoint does not fit {arch['model_name']} with the config in {where}: "
            f"missing {missing[:4]}, other shapes {sorted(mismatched)[:4]}", _TODO)
    try:
        tokenizer = tokenizer_class.from_pretrained(source, local_files_only=local_only)
    except json.JSONDecodeError as err:
        raise ModelLoadError(FLAG, spec, f"a tokenizer file in {where} is not JSON ({err})", _TODO) from err
    return model, tokenizer


def _max_length(config, tokenizer, requested: int | None) -> int:
    limit = MAX_TOKENS
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limit = min(limit, tok_max)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(config, "model_type", "") in _OFFSET_POSITION_TYPES:
            positions -= int(getattr(config, "pad_token_id", 1) or 1) + 1
        limit = min(limit, positions)
    if requested is not None:
        limit = min(limit, int(requested))
    return int(limit)


def _fetch_release_checkpoint(name: str) -> Path:
    """Detoxify's published checkpoint for `name` in torch.hub's cache: downloaded from Detoxify's
    release URL only when it is not cached and the machine is not offline."""
    import torch
    from detoxify.detoxify import MODEL_URLS

    url = MODEL_URLS[name]
    filename = url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.is_file():
        return path
    if _offline():
        raise ModelLoadError(
            FLAG, name, f"Detoxify's checkpoint {filename} is not in torch.hub's cache ({path.parent}) and this "
            "machine is offline (HF_HUB_OFFLINE)", f"download it from {url} into that folder on a machine with "
            "network, or " + _hub_help(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # No hash check, as Detoxify's own download (the names' suffixes are not documented as sha256
        # prefixes); the file's sha256 is recorded in `source` instead.
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except (OSError, http.client.HTTPException) as err:  # no network, DNS failure, refused, HTTP error (URLError is an OSError)
        raise ModelLoadError(FLAG, name, f"downloading {url} failed ({short(err, 100)})",
                             f"download it into {path.parent} on a machine with network, or " + _hub_help(name)) from err
    return path


__all__ = [
    "CLASS_NAME_MAP",
    "DETOXIFY_LABELS",
    "FLAG",
    "ModelLoadError",
    "ToxicityScorer",
    "ToxicityScores",
    "max_score",
    "save_detoxify_checkpoint",
    "sha256_file",
]
