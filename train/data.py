"""The trainer's shard reader: webdataset tars (SHARDS.md) -> batches for one cascade stage.

Each sample of `DATASET/shards/NNNNNN.tar` becomes

    image      float32 [3, R, R] in [-1, 1]: the stored image, shorter side resized to R =
               data.resolution and center-cropped (the 1024 stage then takes a random
               data.crop_size crop of it: Imagen App. F trains the 1024 model on 256² crops)
    lowres     SR stages only: the SAME pixels area-downsampled by resolution / lowres_resolution
               (so a crop's low-res twin covers exactly the crop)
    text       float32 [text_max_len, d_model]: the T5 array padded with zeros or cut (train.text),
               from KEY.t5.npy (float16), KEY.t5.bf16 / KEY.t5.f8 (raw, t5_dtype and t5_scale in
               KEY.json), or, for a dataset made with --t5-store meta, the meta parquet's t5 column
    text_mask  bool [text_max_len], True on real tokens

Samples are skipped (and counted, `SkipCounts`) when their stored side is below
data.min_stored_size (from KEY.json: a stage never learns from upscaled pixels, DESIGN.md), when
they fall in the other split, or when a caller's `keep(meta, caption)` says no. A corrupt sample
is skipped and counted by reason (CORRUPT_REASONS: a tar cut off mid-sample, a KEY.json that is not
JSON, a KEY.t5.npy that is a pickled object array, not float, not 2-D or of another d_model than the
stage's unet.text_dim, an image that does not decode), as a web sample is: never trained on, never a
crash. T5 arrays are read with allow_pickle=False. `check_dataset` refuses, before training, a
directory that cannot be trained on at all (train.errors.DatasetError, one line).

Splits: a sample is held out when hash(uid) < holdout_fraction (`holdout_value`), so the same
fraction of the same uids is held out on every run, by every reader, whatever the shard layout.
Training uses split="train", evaluation split="holdout": samples the model never saw.

Two batch sources, both infinite, both deterministic for a seed and both resumable exactly:

    CachedSource     decodes the split once into memory (uint8) and draws batch k (micro-step k of
                     the whole run) from a per-epoch seeded permutation: its position is just k,
                     so resuming at step N continues bit-for-bit. Used when the split fits in
                     `cache_max_bytes` (tests, tiny presets, small fine-tuning sets).
    StreamingSource  the shard list re-shuffled per epoch (seeded), split over DDP ranks and
                     DataLoader workers (as webdataset's split_by_node / split_by_worker do),
                     a seeded shuffle buffer; resumes by skipping the
                     batches already consumed (exact, costs decoding them again).

    source = make_source(cfg, "DATASET", seed=0)          # picks one; cfg = train.config.Config
    batch = source.next()    # {"image", "text", "text_mask", ["lowres"], "caption", "key"}
    state = source.state_dict(); ...; source.load_state_dict(state)

No text encoder here: the T5 arrays were computed by `kiln prepare` (DESIGN.md).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count, islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from train.decode import open_at_size
from train.errors import DatasetError, MissingFile, NoSamples, one_line
from train.text import collate_text

__all__ = [
    "CachedSource",
    "ImageSpec",
    "SkipCounts",
    "StreamingSource",
    "check_dataset",
    "collate_examples",
    "decode_record",
    "holdout_value",
    "in_split",
    "load_records",
    "make_example",
    "make_source",
    "shard_urls",
]

IMAGE_EXTENSIONS = ("jpg", "png", "webp")  # `kiln prepare --encode-format`
SPLITS = ("train", "holdout", "all")
DEFAULT_CACHE_MAX_BYTES = 2 * 2**30  # decoded uint8 pixels a CachedSource may hold


# --------------------------------------------------------------------------------------------
# What to read


def shard_urls(data_dir: str | Path) -> list[str]:
    """The dataset's tar paths in shard order: from manifest.json when present, else shards/*.tar."""
    root = Path(data_dir)
    if not root.exists():
        raise MissingFile(f"dataset {root} does not exist: give a `kiln prepare` output directory")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a dataset: give a `kiln prepare` output directory")
    manifest = root / "manifest.json"
    if manifest.exists():
        try:
            shards = json.loads(manifest.read_text())["shards"]
            urls = [str(root / s["tar"]) for s in shards if s.get("samples", 1)]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{manifest} is unreadable ({type(err).__name__}: {one_line(err)}): "
                               "re-run `kiln prepare` to rewrite it") from err
    else:
        urls = [str(p) for p in sorted((root / "shards").glob("*.tar"))]
    if not urls:
        raise DatasetError(f"{root} is not a kiln dataset: no shards (expected manifest.json and "
                           "shards/NNNNNN.tar, SHARDS.md); give a `kiln prepare` output directory")
    return urls


PEEK_SAMPLES = 64  # samples check_dataset reads to see what the T5 arrays are


def check_dataset(data_dir: str | Path, spec: ImageSpec | None = None) -> list[str]:
    """Refuse, in one line (DatasetError / MissingFile), a directory a stage cannot train on:
    missing, not a kiln dataset, shards missing, made with `--t5 off` (no KEY.t5.npy), or T5
    arrays of another d_model than `spec.d_model`. Reads stats.json and the first samples only.
    Returns the shard paths."""
    root = Path(data_dir)
    urls = shard_urls(root)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DatasetError(f"{root}: {len(missing)} of {len(urls)} shards listed in manifest.json are missing "
                           f"(first: {missing[0]}); re-run the same `kiln prepare` command to rewrite them")
    d_model = spec.d_model if spec is not None else None
    no_t5 = (f"{root} has no T5 arrays (KEY.t5.npy): it was prepared with --t5 off; re-run `kiln prepare` "
             "with T5 on to train on it")

    def wrong_width(width) -> DatasetError:
        return DatasetError(f"{root} holds T5 arrays of d_model {width}, the stage wants unet.text_dim {d_model}: "
                            f"use a preset made for that text encoder (or --override unet.text_dim={width}), "
                            "or re-embed the captions with the stage's T5")

    try:
        stats = json.loads((root / "stats.json").read_text())
    except (OSError, ValueError):
        stats = None
    if isinstance(stats, dict):
        if (stats.get("stage_modes") or {}).get("t5") == "off":
            raise DatasetError(no_t5)
        width = ((stats.get("models") or {}).get("t5") or {}).get("d_model")
        if d_model is not None and isinstance(width, int) and width != d_model:
            raise wrong_width(width)
    read = with_t5 = 0
    widths: dict[int, int] = {}
    for sample in islice(_raw_samples(urls), PEEK_SAMPLES):
        if sample.get("__truncated__"):
            continue
        read += 1
        ext5 = next((e for e in T5_MEMBERS if e in sample), None)
        if ext5 is not None:
            with_t5 += 1
            try:
                w = int(load_t5_member(ext5, sample[ext5], _json_or_empty(sample)).shape[1])
                widths[w] = widths.get(w, 0) + 1
            except CorruptSample:
                pass
    if read and not with_t5:
        raise DatasetError(no_t5)
    if d_model is not None and widths and d_model not in widths:
        raise wrong_width(max(widths, key=widths.get))
    return urls


def holdout_value(uid: str) -> float:
    """A number in [0, 1) fixed by the uid alone: the sample is held out when it is < the fraction.

    Hashed again (not uid[:16], which picks the shard) so the held-out set spreads over all shards."""
    digest = hashlib.sha256(b"kiln-holdout:" + uid.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_split(uid: str, split: str, holdout_fraction: float) -> bool:
    if split == "all":
        return True
    held = holdout_value(uid) < holdout_fraction
    return held if split == "holdout" else not held


@dataclass(frozen=True)
class ImageSpec:
    """The pixel side of a stage's DataConfig (resolution, low-res side, crops, text length)."""

    resolution: int
    lowres_resolution: int | None = None  # None: a base stage, no conditioning image
    random_crop: bool = False
    crop_size: int | None = None
    text_max_len: int = 128
    min_stored_size: int = 0
    d_model: int | None = None  # the stage's unet.text_dim: T5 arrays of another width are skipped

    @classmethod
    def from_config(cls, cfg) -> ImageSpec:
        d = cfg.data
        return cls(
            resolution=d.resolution,
            lowres_resolution=d.lowres_resolution if cfg.stage == "sr" else None,
            random_crop=bool(d.random_crop),
            crop_size=d.crop_size,
            text_max_len=d.text_max_len,
            min_stored_size=d.min_stored_size if d.min_stored_size is not None else d.resolution,
            d_model=cfg.unet.text_dim,
        )

    @property
    def output_size(self) -> int:
        """Side of the `image` tensor: the crop size when cropping, else the resolution."""
        return self.crop_size if self.random_crop else self.resolution

    @property
    def lowres_size(self) -> int | None:
        """Side of the `lowres` tensor (a crop's low-res twin is proportionally smaller)."""
        if self.lowres_resolution is None:
            return None
        return self.output_size * self.lowres_resolution // self.resolution


# Why a corrupt sample was skipped (SkipCounts fields), in the order a reader checks them.
CORRUPT_REASONS = ("truncated", "bad_meta", "t5_pickle", "bad_t5", "t5_dtype", "wrong_d_model", "bad_image")


@dataclass
class SkipCounts:
    """What a reader saw and why samples did not reach a batch.

    Training data is treated like web data: a corrupt sample is skipped and counted by reason
    (CORRUPT_REASONS), never trained on and never a crash."""

    seen: int = 0
    kept: int = 0
    other_split: int = 0
    too_small: int = 0  # stored side < data.min_stored_size
    filtered: int = 0  # the caller's keep() said no
    no_text: int = 0  # no KEY.t5.npy (a dataset made with --t5 off)
    truncated: int = 0  # cut off by a truncated or corrupt tar (the rest of that shard is unreadable)
    bad_meta: int = 0  # KEY.json missing or not a JSON object
    t5_pickle: int = 0  # KEY.t5.npy is an object array: loading it would unpickle, which kiln never does
    bad_t5: int = 0  # KEY.t5.npy unreadable or not [t5_len, d_model]
    t5_dtype: int = 0  # KEY.t5.npy not a float array (e.g. int64)
    wrong_d_model: int = 0  # KEY.t5.npy's d_model is not the stage's unet.text_dim
    bad_image: int = 0  # no image member, or it does not decode (e.g. a corrupt JPEG)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def corrupt(self) -> int:
        return sum(getattr(self, r) for r in CORRUPT_REASONS)

    def skipped(self) -> dict:
        """The non-zero skip reasons: {"too_small": 4, "bad_image": 1, ...}."""
        return {k: v for k, v in self.__dict__.items() if k not in ("seen", "kept") and v}

    def add(self, other: SkipCounts | dict) -> None:
        for k, v in (other.as_dict() if isinstance(other, SkipCounts) else other).items():
            setattr(self, k, getattr(self, k) + int(v))


# --------------------------------------------------------------------------------------------
# One sample


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (area averaging when shrinking, bicubic when enlarging), centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size)) if (nw, nh) != (size, size) else img


@dataclass
class Record:
    """A decoded sample before per-step randomness: uint8 pixels at the stage resolution + raw T5."""

    key: str
    image: torch.Tensor  # uint8 [3, R, R]
    text: np.ndarray  # float16 [t5_len, d_model], unpadded
    caption: str
    meta: dict = field(repr=False)


def load_t5(data: bytes) -> np.ndarray:
    """A KEY.t5.npy member -> its array, never unpickling. Raises `CorruptSample(reason)`."""
    try:
        text = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise CorruptSample("t5_pickle") from err
        raise CorruptSample("bad_t5") from err
    except Exception as err:  # a truncated header, garbage bytes: numpy raises several kinds
        raise CorruptSample("bad_t5") from err
    if not isinstance(text, np.ndarray):
        raise CorruptSample("bad_t5")
    if text.dtype.hasobject:
        raise CorruptSample("t5_pickle")
    if not np.issubdtype(text.dtype, np.floating):
        raise CorruptSample("t5_dtype")
    if text.ndim != 2 or text.shape[0] < 1:
        raise CorruptSample("bad_t5")
    return text


# A sample's T5 array, in the order a reader looks for it (SHARDS.md, `kiln prepare --t5-dtype`):
# KEY.t5.npy (float16 .npy), KEY.t5.bf16 (raw bfloat16), KEY.t5.f8 (raw float8_e4m3fn x t5_scale),
# and "t5.f16": raw float16 from the meta parquet's t5 column (`--t5-store meta`; never a tar member).
T5_MEMBERS = ("t5.npy", "t5.bf16", "t5.f8", "t5.f16")
_RAW_T5 = {"t5.f16": 2, "t5.bf16": 2, "t5.f8": 1}  # bytes per value
_META_T5_EXT = {"float16": "t5.f16", "bfloat16": "t5.bf16", "float8_e4m3fn": "t5.f8"}  # meta t5_dtype -> member


@functools.cache
def _e4m3_values() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn codes (two are NaN)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def load_t5_member(ext: str, data: bytes, meta: dict) -> np.ndarray:
    """A sample's T5 member (`T5_MEMBERS`) -> [t5_len, d_model]: float16 for .npy and raw float16,
    float32 for bfloat16 and float8 (exact: both widen to float32 without rounding, float8 then
    times t5_scale). Raw members take their row count from KEY.json's t5_len. Raises CorruptSample."""
    if ext == "t5.npy":
        return load_t5(data)
    try:
        rows = int(meta["t5_len"])
        scale = float(meta.get("t5_scale") if meta.get("t5_scale") is not None else 1.0)
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptSample("bad_t5") from err
    size = _RAW_T5[ext]
    if rows < 1 or not data or len(data) % (rows * size) or not (math.isfinite(scale) and scale > 0):
        raise CorruptSample("bad_t5")
    if ext == "t5.f16":
        text = np.frombuffer(data, dtype="<f2").astype(np.float16).reshape(rows, -1)
    elif ext == "t5.bf16":
        text = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(rows, -1)
    else:
        text = _e4m3_values()[np.frombuffer(data, dtype=np.uint8)].reshape(rows, -1) * np.float32(scale)
    if not np.isfinite(text).all():
        raise CorruptSample("bad_t5")
    return text


def _json_or_empty(sample: dict) -> dict:
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


class _MetaT5:
    """The meta parquet's t5 cells of one shard, read a row group at a time alongside its tar
    (both are in uid order, SHARDS.md): for datasets made with `--t5-store meta`, whose tars hold
    no T5 member. A missing or unreadable meta file, or one without a t5 column, gives nothing
    (those samples then count as no_text)."""

    def __init__(self, tar_url: str):
        tar = Path(tar_url)
        self.rows = self._rows(tar.parent.parent / "meta" / f"{tar.stem}.parquet")
        self.head = None

    @staticmethod
    def _rows(path: Path):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(str(path))
            names = pf.schema_arrow.names
            if "uid" not in names or "t5" not in names:
                return
            columns = ["uid", "t5"] + (["t5_dtype"] if "t5_dtype" in names else [])
            for batch in pf.iter_batches(columns=columns, batch_size=64):
                d = batch.to_pydict()
                for i, uid in enumerate(d["uid"]):
                    yield uid, d["t5_dtype"][i] if "t5_dtype" in d else "float16", d["t5"][i]
        except Exception:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            return

    def get(self, key: str):
        """(uid, t5_dtype, bytes) of `key`, or None; keys must come in increasing order."""
        while True:
            if self.head is None:
                self.head = next(self.rows, None)
                if self.head is None:
                    return None
            uid = self.head[0]
            if uid is None or uid < key:
                self.head = None
                continue
            if uid == key:
                row, self.head = self.head, None
                return row
            return None


def _with_meta_t5(url: str, samples: Iterator[dict]) -> Iterator[dict]:
    """Attach the meta parquet's T5 cell (as `_META_T5_EXT`'s member) to every sample whose tar
    holds no T5 member; the meta file is opened only when such a sample appears."""
    meta_t5 = None
    for sample in samples:
        if not sample.get("__truncated__") and "json" in sample and not any(e in sample for e in T5_MEMBERS):
            meta_t5 = meta_t5 or _MetaT5(url)
            row = meta_t5.get(sample["__key__"])
            if row is not None and row[2] is not None and row[1] in _META_T5_EXT:
                sample[_META_T5_EXT[row[1]]] = row[2]
        yield sample


class CorruptSample(Exception):
    """A sample that cannot be trained on; `reason` is a SkipCounts field (CORRUPT_REASONS)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_record(
    sample: dict,
    spec: ImageSpec,
    *,
    split: str = "train",
    holdout_fraction: float = 0.0,
    keep: Callable[[dict, str], bool] | None = None,
    counts: SkipCounts | None = None,
) -> Record | None:
    """A webdataset sample dict (raw bytes per extension) -> Record, or None if it is skipped
    (counted in `counts` by reason: a corrupt member skips its sample, it never raises)."""
    counts = counts if counts is not None else SkipCounts()
    counts.seen += 1
    try:
        return _decode(sample, spec, split, holdout_fraction, keep, counts)
    except CorruptSample as err:
        setattr(counts, err.reason, getattr(counts, err.reason) + 1)
        return None


def _decode(sample, spec, split, holdout_fraction, keep, counts) -> Record | None:
    key = sample["__key__"]
    if sample.get("__truncated__"):
        raise CorruptSample("truncated")
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError) as err:  # no member, not UTF-8, not JSON
        raise CorruptSample("bad_meta") from err
    if not isinstance(meta, dict):
        raise CorruptSample("bad_meta")
    uid = meta.get("uid", key)
    if not in_split(str(uid), split, holdout_fraction):
        counts.other_split += 1
        return None
    try:
        side = min(int(meta.get("stored_width", 0)), int(meta.get("stored_height", 0)))
    except (TypeError, ValueError) as err:
        raise CorruptSample("bad_meta") from err
    if side < spec.min_stored_size:
        counts.too_small += 1
        return None
    try:
        caption = sample["txt"].decode("utf-8") if "txt" in sample else str(meta.get("TEXT", ""))
    except UnicodeDecodeError as err:
        raise CorruptSample("bad_meta") from err
    if keep is not None and not keep(meta, caption):
        counts.filtered += 1
        return None
    ext5 = next((e for e in T5_MEMBERS if e in sample), None)
    if ext5 is None:
        counts.no_text += 1
        return None
    text = load_t5_member(ext5, sample[ext5], meta)
    if spec.d_model is not None and text.shape[1] != spec.d_model:
        raise CorruptSample("wrong_d_model")
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise CorruptSample("bad_image")
    try:
        # JPEG draft decoding at the stage's size (train.decode): a 1024 px sample for the 64 px
        # stage is decoded at 128 px, then resized as before.
        img = _resize_center_crop(open_at_size(sample[ext], spec.resolution), spec.resolution)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptSample("bad_image") from err
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    counts.kept += 1
    return Record(key=key, image=pixels, text=text, caption=caption, meta=meta)


def make_example(record: Record, spec: ImageSpec, rng: np.random.Generator | None = None) -> dict:
    """A Record -> training example: [-1, 1] float image (cropped if the stage crops), the low-res
    twin of exactly those pixels for SR, and the raw T5 array (padded per batch by collate)."""
    image = record.image
    if spec.random_crop:
        c, r = spec.crop_size, spec.resolution
        rng = rng if rng is not None else np.random.default_rng(0)
        top, left = (int(v) for v in rng.integers(0, r - c + 1, size=2))
        image = image[:, top : top + c, left : left + c]
    x = image.float().div(127.5).sub(1.0)
    out = {"image": x, "text": record.text, "caption": record.caption, "key": record.key}
    if spec.lowres_size is not None:
        # Area averaging (an exact box filter for integer factors): the stage's conditioning image
        # is the same picture at lower resolution, as the base stage would have drawn it.
        out["lowres"] = F.interpolate(x[None], size=(spec.lowres_size,) * 2, mode="area")[0]
    return out


def collate_examples(examples: list[dict], text_max_len: int) -> dict:
    """Stack examples into a batch; T5 arrays padded/cut to text_max_len with their mask."""
    text, mask = collate_text([e["text"] for e in examples], text_max_len)
    batch = {
        "image": torch.stack([e["image"] for e in examples]),
        "text": text,
        "text_mask": mask,
        "caption": [e["caption"] for e in examples],
        "key": [e["key"] for e in examples],
    }
    if "lowres" in examples[0]:
        batch["lowres"] = torch.stack([e["lowres"] for e in examples])
    if any("skipped" in e for e in examples):  # a streaming reader's corrupt-sample counts
        skipped: dict = {}
        for e in examples:
            for reason, n in e.get("skipped", {}).items():
                skipped[reason] = skipped.get(reason, 0) + n
        batch["skipped"] = skipped
    return batch


_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's KEY.EXT split (first dot of the name)
TAR_END = 1024  # a complete tar ends with two zero 512-byte blocks


def _tar_complete(path: str) -> bool:
    """Whether the tar file at `path` ends with its end-of-archive blocks (a truncated copy does
    not; a cut that falls between members would otherwise read as a clean, shorter shard)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < TAR_END or size % 512:
                return False
            f.seek(size - TAR_END)
            return not any(f.read(TAR_END))
    except OSError:
        return False


def _tar_samples(url: str, expected: int | None = None) -> Iterator[dict]:
    """One shard's samples as webdataset dicts ({"__key__", "__url__", ext: bytes}), in tar order.

    A tar that is truncated or corrupt yields what it holds before the damage; the sample the
    damage cut off is yielded with "__truncated__": True (decode_record counts it, reason
    `truncated`) and the rest of the shard is not read. When the manifest says how many samples
    the shard holds (`expected`), each one lost after the damage is yielded as such a marker too,
    so the skip counts say how many samples the damage cost."""
    current: dict | None = None
    read = 0
    try:
        complete = _tar_complete(url)
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                name = member.name
                if "/" not in name and name.startswith("__") and name.endswith("__"):
                    continue
                m = _KEY_EXT.match(name)
                if m is None:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if current is None or key != current["__key__"] or ext in current:
                    if current is not None:  # complete: the next sample's header was read whole
                        read += 1
                        yield current
                    current = {"__key__": key, "__url__": url}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"{name}: {len(data)} of {member.size} bytes")
                current[ext] = data
        if current is not None:
            read += 1
            if not complete:
                current["__truncated__"] = True  # the cut may have fallen inside this sample
            yield current
        if complete:
            return
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        read += 1
        yield {**(current or {"__key__": f"{Path(url).name}:unreadable", "__url__": url}), "__truncated__": True}
    for i in range(max(0, (expected or 0) - read)):
        yield {"__key__": f"{Path(url).name}:lost-{i}", "__url__": url, "__truncated__": True}


def _raw_samples(urls: list[str], nodesplitter=None, workersplitter=None,
                 expected: dict[str, int] | None = None) -> Iterator[dict]:
    """Raw sample dicts in tar order (no shuffling, no decoding). Without splitters every caller
    reads every shard (a CachedSource then slices batches by rank itself); a splitter maps the
    shard list to this reader's share (as webdataset's node/worker splitters do). `expected`:
    samples per shard path (`shard_sizes`), to count what a damaged shard lost."""
    urls = list(urls)
    if nodesplitter is not None:
        urls = list(nodesplitter(urls))
    if workersplitter is not None:
        urls = list(workersplitter(urls))
    for url in urls:
        yield from _with_meta_t5(url, _tar_samples(url, (expected or {}).get(url)))


def shard_sizes(data_dir: str | Path) -> dict[str, int]:
    """{shard path (as shard_urls gives it): samples} from manifest.json; {} without one."""
    root = Path(data_dir)
    try:
        shards = json.loads((root / "manifest.json").read_text())["shards"]
        return {str(root / s["tar"]): int(s["samples"]) for s in shards}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def load_records(
    data_dir: str | Path,
    spec: ImageSpec,
    *,
    split: str = "all",
    holdout_fraction: float = 0.0,
    keep: Callable[[dict, str], bool] | None = None,
    limit: int | None = None,
    counts: SkipCounts | None = None,
) -> list[Record]:
    """Every (or the first `limit`) kept sample of a split, in shard order (sorted by uid)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    counts = counts if counts is not None else SkipCounts()
    out = []
    for sample in _raw_samples(shard_urls(data_dir), expected=shard_sizes(data_dir)):
        rec = decode_record(sample, spec, split=split, holdout_fraction=holdout_fraction, keep=keep, counts=counts)
        if rec is not None:
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    return out


# --------------------------------------------------------------------------------------------
# Batch sources


class CachedSource:
    """An in-memory split; micro-batch k is a pure function of (seed, k, rank): exact resume.

    Position p = (k * world_size + rank) * batch_size + i of the run's sample stream is sample
    perm_e[p mod N] with e = p // N and perm_e a permutation seeded by (seed, e); a random crop
    of position p draws from a generator seeded by (seed, p). So ranks read disjoint slices of
    each global batch, every epoch visits every sample once, and no state but k is needed."""

    kind = "cached"

    def __init__(self, records: list[Record], spec: ImageSpec, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, counts: SkipCounts | None = None):
        if not records:
            skipped = (counts or SkipCounts()).skipped()
            raise NoSamples(f"no samples to train on: every sample was skipped ({skipped or 'none were read'}); "
                            "check --data, the stage's min_stored_size and the holdout fraction")
        self.records, self.spec, self.batch_size = records, spec, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.counts = counts or SkipCounts(seen=len(records), kept=len(records))
        self.position = 0  # micro-batches consumed
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self.records)

    def _index(self, p: int) -> int:
        epoch, i = divmod(p, len(self.records))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
            self._perm_epoch = epoch
        return int(self._perm[i])

    def batch_at(self, k: int) -> dict:
        start = (k * self.world_size + self.rank) * self.batch_size
        examples = []
        for p in range(start, start + self.batch_size):
            rng = np.random.default_rng([self.seed, 1, p]) if self.spec.random_crop else None
            examples.append(make_example(self.records[self._index(p)], self.spec, rng))
        return collate_examples(examples, self.spec.text_max_len)

    def next(self) -> dict:
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": self.kind, "position": self.position, "seed": self.seed, "samples": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or state.get("samples") != len(self.records):
            raise ValueError(f"data state {state} does not match this source ({self.kind}, {len(self.records)} samples): "
                             "resume with the same dataset, split and filters")
        self.position = int(state["position"])


class _StreamDataset(torch.utils.data.IterableDataset):
    """Infinite examples for one DDP rank; inside a DataLoader worker, that worker's share.

    Epoch e: the shard list permuted by (seed, e), split over ranks, then over workers (by shard
    when there are enough shards for everyone, else by sample), samples through a shuffle buffer
    seeded by (seed, e, rank, worker)."""

    def __init__(self, urls, spec, *, seed, rank, world_size, split, holdout_fraction, keep, shuffle_buffer,
                 expected=None):
        self.urls, self.spec, self.seed = list(urls), spec, seed
        self.expected = dict(expected or {})
        self.rank, self.world_size = rank, world_size
        self.split, self.holdout_fraction, self.keep = split, holdout_fraction, keep
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers = self.world_size * workers
        me = self.rank * workers + worker
        by_shard = len(self.urls) >= readers
        yielded = False
        reported: dict = {}
        for epoch in count():
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
            urls = [self.urls[i] for i in order]
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
            if by_shard:
                # Split by shard, given the rank/worker we computed (torch.distributed need not be
                # initialised in tests that fake a rank).
                samples = _raw_samples(urls, nodesplitter=lambda s: islice(s, self.rank, None, self.world_size),
                                       workersplitter=lambda s: islice(s, worker, None, workers), expected=self.expected)
            else:
                samples = islice(_raw_samples(urls, expected=self.expected), me, None, readers)
            counts = SkipCounts()
            if epoch == 0:
                first = counts
            decoded = (decode_record(s, self.spec, split=self.split, holdout_fraction=self.holdout_fraction,
                                     keep=self.keep, counts=counts) for s in samples)
            for rec in _shuffled((r for r in decoded if r is not None), self.shuffle_buffer, rng):
                yielded = True
                example = make_example(rec, self.spec, rng)
                # The first epoch's corrupt samples travel to the main process with the examples
                # (DataLoader workers share no memory): StreamingSource adds them to its counts.
                example["skipped"] = {r: getattr(first, r) - reported.get(r, 0) for r in CORRUPT_REASONS
                                      if getattr(first, r) != reported.get(r, 0)}
                reported = {r: getattr(first, r) for r in CORRUPT_REASONS}
                yield example
            if not yielded:
                raise NoSamples(f"reader {me} of {readers} found no samples to train on in an epoch "
                                f"(skipped: {counts.skipped()}); check --data, the stage's min_stored_size "
                                "and the holdout fraction")


def _shuffled(items: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer (webdataset-style): fill, then emit a random slot per new item."""
    buf = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class StreamingSource:
    """Batches streamed from the shards (any dataset size), with DataLoader workers."""

    kind = "stream"

    def __init__(self, urls, spec: ImageSpec, batch_size: int, *, seed=0, rank=0, world_size=1, split="train",
                 holdout_fraction=0.0, keep=None, num_workers=0, shuffle_buffer=1000, counts: SkipCounts | None = None,
                 expected: dict[str, int] | None = None):
        self.spec, self.batch_size, self.seed, self.num_workers = spec, batch_size, seed, num_workers
        self.counts = counts or SkipCounts()
        self.dataset = _StreamDataset(urls, spec, seed=seed, rank=rank, world_size=world_size, split=split,
                                      holdout_fraction=holdout_fraction, keep=keep, shuffle_buffer=shuffle_buffer,
                                      expected=expected)
        self.position = 0
        self._iter = None

    def _loader(self):
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=functools.partial(collate_examples, text_max_len=self.spec.text_max_len),
            persistent_workers=False, prefetch_factor=2 if self.num_workers else None,
        ))

    def _next_batch(self) -> dict:
        batch = next(self._iter)
        for reason, n in batch.pop("skipped", {}).items():
            setattr(self.counts, reason, getattr(self.counts, reason) + n)
            self.counts.kept = max(0, self.counts.kept - n)  # scan_meta counted them as kept
        return batch

    def next(self) -> dict:
        if self._iter is None:
            self._iter = self._loader()
            for _ in range(self.position):  # resume: skip what was consumed (same seeded stream)
                self._next_batch()
        self.position += 1
        return self._next_batch()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"data state {state} was saved by a {state.get('kind')} source, this one streams")
        self.position, self._iter = int(state["position"]), None


def scan_meta(data_dir: str | Path, spec: ImageSpec, split: str = "train", holdout_fraction: float = 0.0) -> SkipCounts:
    """Skip counts from meta/*.parquet alone (no pixels): what a streaming reader will skip."""
    import pyarrow.parquet as pq

    counts = SkipCounts()
    for path in sorted((Path(data_dir) / "meta").glob("*.parquet")):
        t = pq.read_table(path, columns=["uid", "stored_width", "stored_height"]).to_pydict()
        for uid, w, h in zip(t["uid"], t["stored_width"], t["stored_height"]):
            counts.seen += 1
            if not in_split(uid, split, holdout_fraction):
                counts.other_split += 1
            elif min(w, h) < spec.min_stored_size:
                counts.too_small += 1
            else:
                counts.kept += 1
    return counts


def make_source(
    cfg,
    data_dir: str | Path,
    *,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    holdout_fraction: float = 0.0,
    keep: Callable[[dict, str], bool] | None = None,
    cache: str = "auto",
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
    batch_size: int | None = None,
    num_workers: int | None = None,
):
    """A batch source for `cfg` (a train.config.Config) over `data_dir`'s shards.

    cache: "auto" caches the split in memory when its decoded pixels fit in `cache_max_bytes`
    (judged from manifest.json's sample count), "always" / "never" force it. num_workers: DataLoader
    workers of a streaming source [cfg.train.num_workers, 0 when that is None; the trainer picks by device]."""
    spec = ImageSpec.from_config(cfg)
    seed = cfg.train.seed if seed is None else seed
    batch_size = batch_size or cfg.train.batch_size
    urls = shard_urls(data_dir)
    if cache not in ("auto", "always", "never"):
        raise ValueError(f"cache must be auto/always/never, got {cache!r}")
    if cache == "auto":
        manifest = Path(data_dir) / "manifest.json"
        n = json.loads(manifest.read_text())["samples"] if manifest.exists() else math.inf
        cache = "always" if n * 3 * spec.resolution**2 <= cache_max_bytes else "never"
    if cache == "always":
        counts = SkipCounts()
        records = load_records(data_dir, spec, split=split, holdout_fraction=holdout_fraction, keep=keep, counts=counts)
        return CachedSource(records, spec, batch_size, seed=seed, rank=rank, world_size=world_size, counts=counts)
    counts = scan_meta(data_dir, spec, split, holdout_fraction)
    if counts.seen and not counts.kept:  # said here, not from inside a DataLoader worker
        raise NoSamples(f"no samples to train on in {data_dir}: every sample is skipped by its metadata "
                        f"({counts.skipped()}); check --data, the stage's min_stored_size and the holdout fraction")
    return StreamingSource(urls, spec, batch_size, seed=seed, rank=rank, world_size=world_size, split=split,
                           holdout_fraction=holdout_fraction, keep=keep, num_workers=num_workers if num_workers is not None else (cfg.train.num_workers or 0), counts=counts,
                           expected=shard_sizes(data_dir))
