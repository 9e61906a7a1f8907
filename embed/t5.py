"""The frozen T5 text encoder: captions -> unpadded float16 embeddings, length-bucketed.

Imagen (§2.1) conditions on a frozen T5-XXL encoder's final hidden states; they never change during
training, so kiln computes them once, in the Beam job, and stores one `[n_tokens, d_model]` float16
array per caption (SHARDS.md): EOS included, no padding, so the attention mask is implied by the
length. The trainer pads on the fly (`train/text.py`) and never loads T5.

    emb = T5Embedder("local:/models/t5-v1_1-xxl")          # or a hub id in the local HF cache
    [r] = emb.embed(["a corgi wearing sunglasses"])
    r.array.shape, r.array.dtype, r.n_tokens, r.truncated   # (9, 4096), float16, 9, False

Model specs:

    "google/t5-v1_1-xxl"   a hub id, resolved from the local Hugging Face cache only (nothing is
                           downloaded: HF_HUB_OFFLINE); missing -> ModelLoadError naming local:DIR
    "local:DIR" or "DIR"   a folder with config.json, the tokenizer (spiece.model and/or
                           tokenizer.json + tokenizer_config.json) and weights: model.safetensors,
                           a sharded model.safetensors.index.json, or pytorch_model.bin[.index.json]
                           (loaded by transformers with weights_only=True). No weights -> error:
                           random weights are never used silently.

A model that cannot be used -- not in the cache, a folder without config.json, tokenizer or weights,
a file that is truncated, not JSON or a pickle that carries code, weights of other shapes than the
config -- raises `embed.errors.ModelLoadError` (a ValueError): one line naming --t5-model (the flag
of both `kiln prepare` and `kiln embed-prompts`), the spec, what is wrong and what to do.

What `embed` does, and why:

- every caption goes through `embed.text.clean_caption` (the same function `kiln embed-prompts`
  uses, so training captions and sampling prompts are encoded from identically cleaned text);
- tokenised with the model's own tokenizer, which appends EOS; a caption longer than `max_length`
  tokens keeps its first `max_length - 1` tokens plus EOS (exactly transformers'
  `truncation=True`) and is flagged `truncated`;
- batched by `embed.batching.plan_batches`: sorted by length within a window, each caption padded
  to `embed.batching.pad_width(its length)` (even widths to 16, then four per octave: at most
  ~7% padding at web caption lengths), batches never mixing widths, under a budget of padded
  tokens. Padding changes the result only by rounding: T5's relative position bias depends only on
  (query - key) offsets, which right-padding leaves unchanged for real tokens, and padded keys are
  masked out of every attention softmax (tested against one-caption-at-a-time encoding);
- and not even by rounding, whatever shares the forward pass -- each caption's bytes are a function
  of the caption, the model and `max_length` alone. DESIGN.md promises that two runs over the same
  input give byte-identical shards, and in `kiln prepare` which captions share a pass depends on
  Beam's bundle boundaries, which differ between runs. Float32 results are not: reductions are
  reordered by the shape of the pass, and the float16 cast keeps some of those last-bit
  differences. Measured on the tiny T5 (CPU, float32, one thread, torch 2.13 with MKL and
  PyTorch's SDPA attention), same caption, bitwise:
    * the padded width matters: the result changes as the width crosses 6, 16, 32 and 48 (a
      12-token caption: one result at widths 12-15, another at 16-128), since softmax and
      probabilities x values run over all `width` keys -- masked keys add exact zeros, but the
      vectorised, blocked reduction order follows the width. Padding each batch to its longest
      caption made 40% of 1,506 captions' float16 bytes change between two bundlings of the same
      input. So the width is `pad_width(length)`, never set by the batch mates;
    * the number of rows matters only for tiny matrices: the BLAS (MKL) rounds a row differently
      when a linear layer's input has very few rows, i.e. token positions in the pass (lone
      linear layers of T5 sizes, 512-10240 wide: 1, 2-15 and 16+ rows give three results, 16+
      identical up to the 16,384 tested; the tiny T5: 1-5 positions differ from 6+). So every
      pass carries at least MIN_TOKENS_PER_PASS (64) token positions, short ones topped up with
      filler rows (an empty caption) that are computed and dropped: ~0.1% of the positions of a
      plan over a full window, 1.6% over the pipeline's 256-caption calls;
    * which captions fill the other rows, and a caption's row within the pass, do not matter
      (each output row of a GEMM is its own dot products; attention never mixes rows).
  `tests/embed/test_t5.py::test_bytes_independent_of_batch_composition` checks it bitwise (alone,
  shuffled, uneven bundles, another budget, cap and window). What this does NOT guarantee: it rests
  on the kernels' behaviour, not on IEEE arithmetic. Another BLAS or CPU (OpenBLAS, ARM), or more
  threads (a BLAS may split a reduction across threads depending on the matrix shape), may have
  other thresholds -- unverified; the test checks the machine it runs on. On CUDA (bfloat16),
  cuBLAS picks its kernel -- split-K reductions included -- by the matrix shape, so a caption's
  bytes can still depend on how many rows its pass has (its width is fixed): exactness there would
  need a fixed row count per width, i.e. passes padded to full with filler rows, which is not done
  and not verified on a GPU here;
- computed in float32 on CPU and bfloat16 on CUDA (T5 v1.1 is known to overflow in float16
  activations), then cast to float16 for storage; a value that is not finite in float16 (|x| >
  65504, or NaN) raises ValueError naming the caption -- never a silent inf in a shard.

`source` is what the run's stats.json and dataset card record. Its `sha256` is the weight file's
sha256 (as `sha256sum model.safetensors` prints it); for a sharded checkpoint it is the sha256 of
the text `sha256sum INDEX SHARD...` prints when run inside the model folder -- one line
"<hex>  <name>\\n" for the index file, then one per shard named in its weight_map, in sorted name
order -- so it can be recomputed with `cd DIR && sha256sum model.safetensors.index.json
$(shard names, sorted) | sha256sum`.

This module imports nothing from `pipeline/` or `train/`. Callers run
`pipeline.compat.ensure_torch_compat()` before constructing an embedder (transformers imports
torchvision).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embed.batching import pad_width, plan_batches, scatter
from embed.errors import ModelLoadError
from embed.text import clean_caption

__all__ = ["FLAG", "CaptionTokens", "EmbedResult", "ModelLoadError", "T5Embedder", "check_model_dir", "load_tokenizer",
           "quiet_hf_progress", "resolve_model_dir", "weight_files", "weights_sha256"]

DEFAULT_MODEL = "google/t5-v1_1-xxl"  # Imagen §2.1: T5-XXL; v1.1 is the public release of that family
# Padded tokens per batch. CPU: compute grows with padded tokens and is already efficient at a few
# hundred rows, so smaller batches only cut padding. CUDA: large enough to fill an H100 with T5-XXL
# (~9 GFLOP per token) while attention scores stay < 1 GB at 128 tokens.
DEFAULT_MAX_TOKENS = {"cpu": 4096, "cuda": 16384}
# A forward pass carries at least this many token positions (filler rows make up the rest): the
# BLAS takes other code paths, with other rounding, for matrices of very few rows (module docstring).
MIN_TOKENS_PER_PASS = 64
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# Weight files in the order transformers prefers them.
_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
FLAG = "--t5-model"
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
_T5_TYPES = ("t5", "mt5", "umt5")
_CONVERT_PICKLE = (
    "python -c \"from transformers import T5EncoderModel as M; M.from_pretrained('DIR').save_pretrained('DIR')\" "
    "(writes model.safetensors; delete pytorch_model.bin after)"
)


def _todo(spec: str) -> str:
    """What to do about a T5 model that cannot be used."""
    if spec.startswith(("local:", "/", ".", "~")) or spec.count("/") != 1 or Path(spec).expanduser().exists():
        return ("pass --t5-model local:DIR, a folder with config.json, the tokenizer (spiece.model / tokenizer.json) "
                "and model.safetensors (e.g. google/t5-v1_1-xxl downloaded on a machine with network)")
    return (f"download it with `huggingface-cli download {spec}` on a machine with network (into the Hugging Face "
            f"cache this machine reads: HF_HOME), or pass --t5-model local:DIR")


@dataclass(frozen=True)
class EmbedResult:
    """One caption's encoding. `array` is float16 [n_tokens, d_model], EOS last, no padding."""

    array: np.ndarray
    n_tokens: int
    truncated: bool  # the cleaned caption had more than max_length tokens (EOS included)
    text: str  # the cleaned caption the encoder saw


# ----------------------------------------------------------------------------------------------
# Locating the model and its weights


def resolve_model_dir(spec: str, check: bool = True) -> Path:
    """The local folder holding model `spec` ("local:DIR", an existing DIR, or a cached hub id).

    With `check`, the folder must hold what T5Embedder loads (`check_model_dir`). Anything missing
    -> ModelLoadError (one line: --t5-model, the spec, what is wrong, what to do)."""
    if spec.startswith("local:"):
        path = Path(spec[len("local:"):]).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise ModelLoadError(FLAG, spec, f"the T5 model folder {path} {what}", _todo(spec))
        path = path.resolve()
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser().resolve()
    elif spec.count("/") != 1 or spec.startswith(("/", ".", "~")):
        raise ModelLoadError(FLAG, spec, "is neither a folder nor a hub id (org/name)", _todo(spec))
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(repo_id=spec, local_files_only=True))
        except (OSError, ValueError) as err:  # LocalEntryNotFoundError (an OSError); HFValidationError: a malformed id
            raise ModelLoadError(
                FLAG, spec, "is not in the local Hugging Face cache, and kiln downloads nothing at run time",
                _todo(spec)) from err
    if check:
        check_model_dir(path, spec)
    return path


def check_model_dir(model_dir: str | os.PathLike, spec: str | None = None) -> None:
    """ModelLoadError unless `model_dir` holds a T5 config.json (JSON, a T5 model_type), a tokenizer
    (spiece.model or tokenizer.json) and weights (`weight_files`). Reads only the small files."""
    model_dir = Path(model_dir)
    spec = spec or str(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(FLAG, spec, f"no config.json in {model_dir}", _todo(spec))
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(FLAG, spec, f"{cfg_path} is not JSON ({err})", _todo(spec)) from err
    if not isinstance(cfg, dict):
        raise ModelLoadError(FLAG, spec, f"{cfg_path} is not a JSON object", _todo(spec))
    if cfg.get("model_type") not in _T5_TYPES:
        raise ModelLoadError(FLAG, spec, f"{cfg_path} describes a {cfg.get('model_type')!r} model, not T5 "
                             f"(model_type one of {list(_T5_TYPES)})", _todo(spec))
    if not any((model_dir / n).is_file() for n in _TOKENIZER_FILES):
        raise ModelLoadError(FLAG, spec, f"no tokenizer in {model_dir} (expected {' or '.join(_TOKENIZER_FILES)}, with "
                             "tokenizer_config.json)", _todo(spec))
    weight_files(model_dir, spec)


def weight_files(model_dir: str | os.PathLike, spec: str | None = None) -> tuple[Path, list[Path]]:
    """(the file transformers loads first, every file holding weights) for a model folder."""
    model_dir = Path(model_dir)
    spec = spec or str(model_dir)
    for name in _WEIGHT_NAMES:
        path = model_dir / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ModelLoadError(FLAG, spec, f"{path} is not a weight index (JSON with a weight_map: "
                                     f"{type(err).__name__}: {err})", _todo(spec)) from err
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise ModelLoadError(FLAG, spec, f"{path} names {len(missing)} missing shard file(s), e.g. {missing[0]}",
                                     "finish copying the model folder, or " + _todo(spec))
            return path, [path] + [model_dir / s for s in shards]
        return path, [path]
    raise ModelLoadError(FLAG, spec, f"no T5 weights in {model_dir} (expected one of {', '.join(_WEIGHT_NAMES)})",
                         _todo(spec))


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:160]


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 of the weights: the file's own, or for a sharded checkpoint the module docstring's
    combination (sha256 of `sha256sum INDEX SHARD...`'s output, shards in sorted name order)."""
    main, files = weight_files(model_dir)
    if len(files) == 1:
        return _sha256_file(main)
    listing = "".join(f"{_sha256_file(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


@contextlib.contextmanager
def quiet_hf_progress():
    """Silence transformers' per-call progress bars ("Loading weights", "Writing model shards") for
    the duration -- on a Beam worker they are just noise in the logs -- then restore the setting."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _torch_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        return names[dtype]
    return dtype


def load_tokenizer(model_dir: str | os.PathLike, spec: str):
    """The model folder's own tokenizer (local files only); one that does not load -> ModelLoadError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:  # a tokenizer file missing, not JSON, not a sentencepiece model
        raise ModelLoadError(FLAG, spec, f"the tokenizer in {model_dir} does not load ({type(err).__name__}: "
                             f"{_first_line(err)})", _todo(spec)) from err


class CaptionTokens:
    """How many tokens T5Embedder encodes a caption with -- cleaned, EOS included, at most
    `max_length` -- from the model's tokenizer alone (no weights are loaded): what lets a caller
    size batches in tokens before they reach the encoder (`kiln prepare --t5-batch-tokens`).

        count = CaptionTokens("local:/models/t5-v1_1-xxl")
        count("a corgi wearing sunglasses")   # 9, as T5Embedder.tokenize_lengths would say
    """

    def __init__(self, model: str = DEFAULT_MODEL, max_length: int = 128):
        self.max_length = int(max_length)
        self.tokenizer = load_tokenizer(resolve_model_dir(model), model)

    def __call__(self, caption: str) -> int:
        ids = self.tokenizer(clean_caption(caption), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return min(len(ids), self.max_length)


# ----------------------------------------------------------------------------------------------
# The encoder


class T5Embedder:
    """A frozen T5 encoder that turns captions into unpadded float16 embeddings (module docstring).

    `max_length`: tokens kept per caption, EOS included (Imagen uses 128). `max_tokens_per_batch`:
    padded-token budget per forward pass (default by device: DEFAULT_MAX_TOKENS). `max_batch_size`:
    optional cap on captions per pass. `window`: captions sorted together (default: the budget).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        max_length: int = 128,
        max_tokens_per_batch: int | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int | None = None,
        window: int | None = None,
    ):
        from transformers import T5EncoderModel

        self.spec = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _torch_dtype(dtype, self.device)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a token and EOS), got {max_length}")
        self.max_length = int(max_length)
        self.max_tokens_per_batch = int(max_tokens_per_batch or DEFAULT_MAX_TOKENS.get(self.device.type, 4096))
        if self.max_tokens_per_batch < self.max_length:
            raise ValueError(f"max_tokens_per_batch={self.max_tokens_per_batch} must be >= max_length={self.max_length}")
        self.max_batch_size = max_batch_size
        self.window = window

        self.model_dir = resolve_model_dir(model)  # refuses a folder without config.json, tokenizer or weights
        main_file, self._weight_files = weight_files(self.model_dir, model)
        self.weights_path = str(main_file)
        self._sha256: str | None = None

        self.tokenizer = load_tokenizer(self.model_dir, model)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        if self.eos_id is None or self.pad_id is None:
            raise ModelLoadError(FLAG, model, f"the tokenizer in {self.model_dir} has no EOS or PAD token: not a T5 "
                                 "tokenizer", _todo(model))
        self._check_tokenizer()
        self.model = self._load_encoder(T5EncoderModel)
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.d_model = int(self.model.config.d_model)
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise ModelLoadError(
                FLAG, model, f"the tokenizer in {self.model_dir} has {len(self.tokenizer)} tokens but the model's "
                f"vocabulary is {self.model.config.vocab_size} (a tokenizer_config.json missing or from another model?)",
                _todo(model))

    def _load_encoder(self, model_class):
        """The encoder's weights through transformers; a weight file that is truncated, not a
        checkpoint, a pickle that carries code, or of other shapes than config.json -> ModelLoadError.
        transformers' multi-line load report is silenced: what it would say is in that one line."""
        import pickle

        from safetensors import SafetensorError
        from transformers.utils import logging as hf_logging

        spec, what = self.spec, f"the weights in {self.model_dir}"
        verbosity = hf_logging.get_verbosity()
        try:
            with quiet_hf_progress():
                hf_logging.set_verbosity_error()
                model, info = model_class.from_pretrained(
                    str(self.model_dir), dtype=self.dtype, local_files_only=True, output_loading_info=True,
                    ignore_mismatched_sizes=True)  # refused below, in one line
        except pickle.UnpicklingError as err:
            code = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            if code:
                raise ModelLoadError(FLAG, spec, f"{what} are a pickle that carries code ({code.group(1)}) and are "
                                     "refused because loading them could run that code", "if you trust the file, "
                                     f"convert it to safetensors on that machine: {_CONVERT_PICKLE}") from err
            raise ModelLoadError(FLAG, spec, f"{what} are not a PyTorch checkpoint ({_first_line(err)[:80]})",
                                 "copy the folder again, or " + _todo(spec)) from err
        except (SafetensorError, EOFError) as err:
            raise ModelLoadError(FLAG, spec, f"{what} are truncated or not a checkpoint ({_first_line(err)})",
                                 "copy the folder again, or " + _todo(spec)) from err
        except OSError as err:
            raise ModelLoadError(FLAG, spec, f"{what} cannot be read ({_first_line(err)})", _todo(spec)) from err
        finally:
            hf_logging.set_verbosity(verbosity)
        mismatched = list(info.get("mismatched_keys") or ())
        if mismatched:
            key, *shapes = mismatched[0] if isinstance(mismatched[0], tuple | list) else (mismatched[0],)
            shown = f" (file {list(shapes[0])}, config.json {list(shapes[1])})" if len(shapes) == 2 else ""
            raise ModelLoadError(FLAG, spec, f"{what} do not fit its config.json: {len(mismatched)} tensor(s) of other "
                                 f"shapes, e.g. {key}{shown}", _todo(spec))
        missing = sorted(k for k in info.get("missing_keys") or () if k != "encoder.embed_tokens.weight")  # tied to shared
        if missing:
            raise ModelLoadError(FLAG, spec, f"{what} lack {len(missing)} tensor(s) the encoder needs, e.g. {missing[0]} "
                                 "(they would be random)", _todo(spec))
        return model

    def _check_tokenizer(self) -> None:
        """docs/PITFALLS.md: a T5 tokenizer that did not load spiece.model still "works", mapping every
        word to <unk>. A real one round-trips plain lower-case English exactly, without <unk>."""
        probe = "a photo of a dog"
        ids = self.tokenizer(probe).input_ids
        if not ids or ids[-1] != self.eos_id:
            raise ModelLoadError(FLAG, self.spec, f"the tokenizer in {self.model_dir} does not append EOS: {probe!r} -> "
                                 f"{ids}", _todo(self.spec))
        back = self.tokenizer.decode(ids[:-1])
        if self.tokenizer.unk_token_id in ids or back != probe:
            raise ModelLoadError(
                FLAG, self.spec, f"the tokenizer in {self.model_dir} does not round-trip {probe!r} ({ids[:8]} -> "
                f"{back[:40]!r}): its vocabulary (spiece.model / tokenizer.json) did not load", _todo(self.spec))

    # -- provenance ----------------------------------------------------------------------------

    @property
    def sha256(self) -> str:
        if self._sha256 is None:  # lazy: T5-XXL's weights take a while to hash
            self._sha256 = weights_sha256(self.model_dir)
        return self._sha256

    @property
    def source(self) -> dict:
        """What the run's stats and card record about this model."""
        return {
            "spec": self.spec,
            "weights_path": self.weights_path,
            "sha256": self.sha256,
            "d_model": self.d_model,
            "max_length": self.max_length,
            "compute_dtype": str(self.dtype).replace("torch.", ""),
            "stored_dtype": "float16",
        }

    # -- tokenising ----------------------------------------------------------------------------

    def _tokenize_clean(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids (EOS last, at most max_length) and truncation flags for already-cleaned texts."""
        if not texts:
            return [], []
        full = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        ids, truncated = [], []
        for row in full:
            if len(row) > self.max_length:
                # transformers' truncation=True: content cut to max_length - 1, then EOS
                ids.append(row[: self.max_length - 1] + [self.eos_id])
                truncated.append(True)
            else:
                ids.append(row)
                truncated.append(False)
        return ids, truncated

    def tokenize_lengths(self, captions: Sequence[str]) -> list[int]:
        """Tokens each caption is encoded with (cleaned, EOS included, capped at max_length)."""
        ids, _ = self._tokenize_clean([clean_caption(c) for c in captions])
        return [len(r) for r in ids]

    # -- encoding ------------------------------------------------------------------------------

    def embed(self, captions: Sequence[str]) -> list[EmbedResult]:
        """One EmbedResult per caption, in input order (module docstring)."""
        captions = list(captions)
        texts = [clean_caption(c) for c in captions]
        ids, truncated = self._tokenize_clean(texts)
        lengths = [len(r) for r in ids]
        batches = plan_batches(lengths, self.max_tokens_per_batch, self.max_batch_size, self.window, max_width=self.max_length)
        outputs = [self._encode_batch([ids[i] for i in batch], [captions[i] for i in batch]) for batch in batches]
        arrays = scatter(batches, outputs, len(captions))
        return [EmbedResult(a, len(a), t, x) for a, t, x in zip(arrays, truncated, texts)]

    def _encode_batch(self, rows: list[list[int]], captions: list[str]) -> list[np.ndarray]:
        """float16 [len(row), d_model] per row: one forward pass at the rows' common `pad_width`,
        with filler rows up to MIN_TOKENS_PER_PASS tokens (module docstring: both keep each row's
        bytes independent of the others)."""
        width = pad_width(max(len(r) for r in rows), self.max_length)
        if any(pad_width(len(r), self.max_length) != width for r in rows):
            raise RuntimeError("a batch mixes padded widths: plan it with embed.batching.plan_batches")
        n = max(len(rows), -(-MIN_TOKENS_PER_PASS // width))
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        input_ids[len(rows):, 0] = self.eos_id  # filler rows: an empty caption, never returned
        mask[len(rows):, 0] = 1
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[j, : len(row)] = 1
        mask = mask.to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids.to(self.device), attention_mask=mask).last_hidden_state[: len(rows)]
            mask = mask[: len(rows)]
            half = hidden.to(torch.float16)
            # Only real tokens are stored; padded positions may hold anything.
            bad = (~torch.isfinite(half)).any(dim=-1) & mask.bool()
            if bool(bad.any()):
                j = int(bad.any(dim=1).nonzero()[0, 0])
                peak = float(hidden[j, : len(rows[j])].float().abs().max())
                raise ValueError(
                    f"T5 output for caption {captions[j][:80]!r} is outside float16's finite range "
                    f"(max |x| = {peak:.4g} > {_FP16_MAX:.0f}, or NaN): refusing to store inf"
                )
            half = half.cpu().numpy()
        return [half[j, : len(row)].copy() for j, row in enumerate(rows)]  # copies: no view keeps the batch alive
