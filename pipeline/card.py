"""`kiln card DATASET_DIR`: the dataset card (README.md) of a finished `kiln prepare` output.

The card is a Hugging Face dataset card -- a YAML metadata block (`huggingface_hub.DatasetCard`
loads it) followed by the sections of Datasheets for Datasets (Gebru et al., 2021): Motivation,
Composition, Collection process, Preprocessing and filtering, Uses, Distribution, Maintenance --
filled from the run, not from a template:

- the funnel (input rows -> kept, per stage and per reject reason) is recounted from the files a
  reader would read -- every rejects parquet grouped by stage and reason, every meta parquet's rows,
  manifest.json, the tars -- and cross-checked against stats.json; any disagreement raises
  CardError and no card is written;
- every flag, threshold and stage mode, every model with its source and weight sha256, kiln's
  version and commit, the Beam runner and options, the run's start and end;
- opt-outs honoured (X-Robots-Tag directives and the rows each removed), the LICENSE column's mix
  and the top source domains of the kept rows;
- plots beside the card (card_plots/*.png): score distributions with their thresholds, image
  sizes, caption and T5 lengths, and a grid of seeded pseudo-random kept samples;
- known limitations and biases of the filters used, and the questions the card cannot answer.

stats.json stays the machine-readable twin of the card. Everything is streamed shard by shard
(fixed-bin histograms, counters, a bounded heap for the sample grid), so a LAION-400M-sized output
is carded in one pass with bounded memory. The output is deterministic for the same dataset (the
only timestamps are the run's own, copied from stats.json).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import heapq
import io
import json
import re
import shlex
import sys
import tarfile
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.records import STAGES

# `kiln --help` builds this module's parser (add_card_args), so numpy, pyarrow and Beam are
# imported on first use (_load_heavy), not at import time.
np = pq = FileSystems = funnel_from = match = None


def _load_heavy() -> None:
    global np, pq, FileSystems, funnel_from, match
    if np is None:
        import numpy
        import pyarrow.parquet
        from apache_beam.io.filesystems import FileSystems as _fs

        from pipeline import finalize

        np, pq, FileSystems, funnel_from, match = numpy, pyarrow.parquet, _fs, finalize.funnel_from, finalize.match

CARD_NAME = "README.md"
PLOTS_DIR = "card_plots"
SHARD_FILE = re.compile(r"(\d{6})\.(tar|parquet)")

# Hugging Face Hub metadata vocabularies (https://huggingface.co/docs/hub/datasets-cards and
# https://hf.co/docs/hub/repositories-licenses), for the fields this card writes.
SIZE_CATEGORIES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                   "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T")
HF_LICENSES = frozenset({
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
    "etalab-2.0", "eupl-1.1", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0",
    "isc", "lppl-1.3c", "ms-pl", "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1",
    "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr", "unknown", "other",
})
TASK_CATEGORIES = frozenset({
    "text-to-image", "image-to-text", "image-classification", "zero-shot-image-classification",
    "image-feature-extraction", "feature-extraction", "text-classification", "unconditional-image-generation",
    "image-to-image", "visual-question-answering", "text-generation", "other",
})
CREATORS = frozenset({"found", "crowdsourced", "expert-generated", "machine-generated", "no-annotation", "other"})
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
LICENSE_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
UNKNOWN_LICENSE_VALUES = ("", "?", "unknown", "none", "null")

# Columns read from the meta parquet files (never the embeddings).
META_COLUMNS = ("uid", "URL", "TEXT", "LICENSE", "LANGUAGE", "original_width", "original_height", "stored_width",
                "stored_height", "source_format", "image_bytes", "toxicity", "clip_similarity", "punsafe", "t5_len",
                "t5_truncated")
REJECT_COLUMNS = ("stage", "reason", "toxicity", "clip_similarity", "punsafe")
IMAGE_EXTS = ("jpg", "png", "webp")


class CardError(RuntimeError):
    """The dataset's files disagree with stats.json or manifest.json: no card is written."""


# -- small helpers ---------------------------------------------------------------------------------


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _read_bytes(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def _read_json(path: str, what: str) -> dict:
    if not FileSystems.exists(path):
        raise CardError(f"{path}: missing ({what}); is this a finished `kiln prepare` output?")
    return json.loads(_read_bytes(path))


def _write_bytes(path: str, data: bytes) -> None:
    from pipeline.write import _atomic_write

    _atomic_write(path, lambda f: f.write(data))


def _listing(dataset_dir: str, sub: str, ext: str) -> dict[str, int]:
    """{file name: bytes} of the NNNNNN.ext files in dataset_dir/sub."""
    out = {}
    for m in match(_join(dataset_dir, sub, f"*.{ext}")):
        name = m.path.rsplit("/", 1)[-1]
        if SHARD_FILE.fullmatch(name):
            out[name] = m.size_in_bytes
    return out


def _pct(k: int | float, n: int | float) -> str:
    return f"{100.0 * k / n:.2f}%" if n else "-"


def _md(value) -> str:
    """A value for a Markdown table cell: str() as given (so numbers read as in stats.json)."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    if text == "":
        return '""'
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def size_category(n: int) -> str:
    bounds = (10**3, 10**4, 10**5, 10**6, 10**7, 10**8, 10**9, 10**10, 10**11, 10**12)
    for bound, cat in zip(bounds, SIZE_CATEGORIES):
        if n < bound:
            return cat
    return SIZE_CATEGORIES[-1]


def hf_license_id(value) -> str | None:
    """A LICENSE column value (LAION: a Creative Commons URL or '?') -> a Hub licence id, or None."""
    v = (value or "").strip().lower()
    m = re.match(r"^(?:https?://)?(?:www\.)?creativecommons\.org/(licenses|publicdomain)/([a-z-]+)/(\d\.\d)", v)
    if not m:
        return v if v in HF_LICENSES and v not in ("unknown", "other") else None
    family, kind, version = m.groups()
    if family == "publicdomain":
        return "cc0-1.0" if kind == "zero" and version == "1.0" else None
    candidate = f"cc-{kind}-{version}"
    return candidate if candidate in HF_LICENSES else None


def domain_of(url) -> str:
    try:
        host = urlsplit(url or "").hostname or ""
    except ValueError:
        host = ""
    host = host.lower()
    if host.startswith("www."):
        host = host[4:]
    return host or "(no host)"


# -- streaming distributions -----------------------------------------------------------------------


class FloatHist:
    """Fixed fine bins over [lo, hi] per series (values outside are clipped into the end bins)."""

    def __init__(self, lo: float, hi: float, bins: int, series: tuple[str, ...]):
        self.lo, self.hi, self.bins = lo, hi, bins
        self.edges = np.linspace(lo, hi, bins + 1)
        self.counts = {s: np.zeros(bins, np.int64) for s in series}
        self.sum = dict.fromkeys(series, 0.0)
        self.min = dict.fromkeys(series, None)
        self.max = dict.fromkeys(series, None)

    def add(self, series: str, values) -> None:
        v = np.asarray([x for x in values if x is not None], dtype=np.float64)
        v = v[np.isfinite(v)]
        if not v.size:
            return
        idx = np.clip(((v - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64), 0, self.bins - 1)
        self.counts[series] += np.bincount(idx, minlength=self.bins)
        self.sum[series] += float(v.sum())
        lo, hi = float(v.min()), float(v.max())
        self.min[series] = lo if self.min[series] is None else min(self.min[series], lo)
        self.max[series] = hi if self.max[series] is None else max(self.max[series], hi)

    def n(self, series: str) -> int:
        return int(self.counts[series].sum())

    def mean(self, series: str) -> float | None:
        n = self.n(series)
        return self.sum[series] / n if n else None

    def quantile(self, series: str, q: float) -> float | None:
        """The upper edge of the bin holding the q-quantile (resolution: one bin)."""
        c = np.cumsum(self.counts[series])
        if not c.size or c[-1] == 0:
            return None
        i = int(np.searchsorted(c, q * c[-1], side="left"))
        return float(self.edges[min(i + 1, self.bins)])

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins


class IntHist:
    """Exact counts of non-negative integers up to `cap` (larger values share the last bin)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.counts = np.zeros(cap + 1, np.int64)
        self.sum = 0
        self.max = None

    def add(self, values) -> None:
        v = np.asarray([x for x in values if x is not None], dtype=np.int64)
        if not v.size:
            return
        self.counts += np.bincount(np.clip(v, 0, self.cap), minlength=self.cap + 1)
        self.sum += int(v.sum())
        self.max = int(v.max()) if self.max is None else max(self.max, int(v.max()))

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> int | None:
        c = np.cumsum(self.counts)
        if c[-1] == 0:
            return None
        return int(np.searchsorted(c, q * c[-1], side="left"))

    def at_least(self, k: int) -> int:
        return int(self.counts[min(k, self.cap):].sum())


# -- reading and cross-checking the dataset --------------------------------------------------------


@dataclass
class Facts:
    """Everything the card says, read from the dataset's files (and stats.json)."""

    dataset_dir: str
    stats: dict
    manifest: dict
    shards: list[dict] = field(default_factory=list)
    kept: int = 0
    rejected: int = 0
    input_rows: int = 0
    reasons: dict = field(default_factory=dict)  # stage -> reason -> rows
    funnel: list = field(default_factory=list)
    licences: collections.Counter = field(default_factory=collections.Counter)
    has_license_column: bool = False
    languages: collections.Counter = field(default_factory=collections.Counter)
    domains: collections.Counter = field(default_factory=collections.Counter)
    formats: collections.Counter = field(default_factory=collections.Counter)
    image_bytes: int = 0
    t5_truncated: int = 0
    scores: dict = field(default_factory=dict)  # column -> FloatHist
    score_non_null: collections.Counter = field(default_factory=collections.Counter)
    shorter_side: IntHist = field(default_factory=lambda: IntHist(8192))  # original_width/height, px
    stored_side: IntHist = field(default_factory=lambda: IntHist(8192))
    wh: np.ndarray | None = None  # 2-D histogram of original (width, height), log-spaced bins
    caption_chars: IntHist = field(default_factory=lambda: IntHist(4096))
    t5_len: IntHist = field(default_factory=lambda: IntHist(1024))
    samples: list = field(default_factory=list)  # the thumbnail grid's picks
    samples_screened: bool = False  # whether the NSFW head scored the kept samples
    unscreened_samples: bool = False  # draw the grid even when nothing was NSFW-scored
    max_sample_punsafe: float = 0.1
    bytes_by_kind: dict = field(default_factory=dict)


WH_BINS = 40  # log-spaced bins from 16 to 16384 px for the width x height histogram


def _wh_edges():
    return np.geomspace(16, 16384, WH_BINS + 1)
SCORE_SPECS = {
    # column: (lo, hi, fine bins, stage that filters on it, label)
    "clip_similarity": (-1.0, 1.0, 2000, "clip", "CLIP"),
    "punsafe": (0.0, 1.0, 1000, "nsfw", "NSFW"),
    "toxicity": (0.0, 1.0, 1000, "toxicity", "toxicity"),
}


def _read_columns(path: str, wanted):
    """The columns of `wanted` that the Parquet file at `path` has (older outputs lack some)."""
    with FileSystems.open(path) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        return pf.read(columns=[c for c in wanted if c in names])


def _sample_rank(seed: int, uid: str) -> str:
    return hashlib.sha256(f"{seed}:{uid}".encode()).hexdigest()


def collect(dataset_dir: str, *, seed: int = 0, n_samples: int = 16, max_sample_punsafe: float = 0.1,
            verify_tars: bool | None = None, unscreened_samples: bool = False) -> Facts:
    """Read every shard's meta, rejects and tar listing once; cross-check them against
    manifest.json and stats.json. Raises CardError listing every disagreement."""
    _load_heavy()
    dataset_dir = dataset_dir.rstrip("/")
    stats = _read_json(_join(dataset_dir, "stats.json"), "the run's stats")
    manifest = _read_json(_join(dataset_dir, "manifest.json"), "the shard manifest")
    if verify_tars is None:
        verify_tars = "://" not in dataset_dir  # listing remote tars member by member is slow
    facts = Facts(dataset_dir, stats, manifest, max_sample_punsafe=max_sample_punsafe, unscreened_samples=unscreened_samples)
    errors: list[str] = []

    on_disk = {
        "meta": _listing(dataset_dir, "meta", "parquet"),
        "rejects": _listing(dataset_dir, "rejects", "parquet"),
        "shards": _listing(dataset_dir, "shards", "tar"),
    }
    listed = {"meta": set(), "rejects": set(), "shards": set()}
    for s in manifest.get("shards", []):
        listed["meta"].add(s["meta"].rsplit("/", 1)[-1])
        listed["rejects"].add(s["rejects"].rsplit("/", 1)[-1])
        listed["shards"].add(s["tar"].rsplit("/", 1)[-1])
    for sub in ("meta", "rejects", "shards"):
        for name in sorted(listed[sub] - set(on_disk[sub])):
            errors.append(f"{sub}/{name}: listed in manifest.json but missing on disk")
        for name in sorted(set(on_disk[sub]) - listed[sub]):
            errors.append(f"{sub}/{name}: on disk but not in manifest.json")
    facts.bytes_by_kind = {sub: sum(on_disk[sub].values()) for sub in on_disk}

    for col, (lo, hi, bins, _, _) in SCORE_SPECS.items():
        facts.scores[col] = FloatHist(lo, hi, bins, ("kept", "rejected_here", "rejected_elsewhere"))
    facts.wh = np.zeros((len(_wh_edges()) - 1, len(_wh_edges()) - 1), np.int64)
    reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    heap: list = []  # (-rank, uid, shard tar, caption): the n_samples smallest ranks
    any_punsafe = False

    for s in manifest.get("shards", []):
        name = s["shard"]
        meta_path, rej_path, tar_path = (_join(dataset_dir, s["meta"]), _join(dataset_dir, s["rejects"]), _join(dataset_dir, s["tar"]))
        row = {"shard": name, "samples": s.get("samples"), "rejected": s.get("rejected"), "tar_bytes": s.get("bytes")}
        uids = []
        if s["meta"].rsplit("/", 1)[-1] in on_disk["meta"]:
            table = _read_columns(meta_path, META_COLUMNS)
            if table.num_rows != s["samples"]:
                errors.append(f"{s['meta']}: {table.num_rows} rows, manifest.json says {s['samples']} samples")
            cols = {c: table.column(c).to_pylist() for c in table.column_names}
            uids = cols.get("uid", [])
            facts.kept += table.num_rows
            if "LICENSE" in cols:
                facts.has_license_column = True
                facts.licences.update(v if v is not None else "(null)" for v in cols["LICENSE"])
            if "LANGUAGE" in cols:
                facts.languages.update(v if v else "(none)" for v in cols["LANGUAGE"])
            facts.domains.update(domain_of(u) for u in cols.get("URL", []))
            facts.formats.update(v or "(unknown)" for v in cols.get("source_format", []))
            facts.image_bytes += sum(v or 0 for v in cols.get("image_bytes", []))
            facts.t5_truncated += sum(1 for v in cols.get("t5_truncated", []) if v)
            for col in SCORE_SPECS:
                if col in cols:
                    facts.scores[col].add("kept", cols[col])
                    facts.score_non_null[col] += sum(v is not None for v in cols[col])
            ws, hs = cols.get("original_width", []), cols.get("original_height", [])
            facts.shorter_side.add(min(w, h) for w, h in zip(ws, hs) if w is not None and h is not None)
            pairs = np.asarray([(w, h) for w, h in zip(ws, hs) if w and h], dtype=np.float64).reshape(-1, 2)
            if pairs.size:
                facts.wh += np.histogram2d(np.clip(pairs[:, 0], 16, 16383), np.clip(pairs[:, 1], 16, 16383), bins=[_wh_edges(), _wh_edges()])[0].astype(np.int64)
            facts.stored_side.add(min(w, h) for w, h in zip(cols.get("stored_width", []), cols.get("stored_height", [])) if w is not None and h is not None)
            facts.caption_chars.add(len(t) for t in cols.get("TEXT", []) if t is not None)
            facts.t5_len.add(cols.get("t5_len", []))
            punsafe = cols.get("punsafe", [None] * len(uids))
            toxicity = cols.get("toxicity", [None] * len(uids))
            any_punsafe = any_punsafe or any(p is not None for p in punsafe)
            for uid, text, p, t in zip(uids, cols.get("TEXT", [None] * len(uids)), punsafe, toxicity):
                # Only samples the NSFW head scored low (and whose captions scored non-toxic) go
                # in the grid: a public card shows them. With --nsfw off nothing is scored, and
                # the card says the grid is unscreened.
                if p is not None and p > max_sample_punsafe:
                    continue
                if t is not None and t > 0.5:
                    continue
                entry = (_sample_rank(seed, uid), uid, s["tar"], text or "", p)
                if len(heap) < n_samples:
                    heapq.heappush(heap, _Neg(entry))
                elif entry[0] < heap[0].entry[0]:
                    heapq.heapreplace(heap, _Neg(entry))
        if s["rejects"].rsplit("/", 1)[-1] in on_disk["rejects"]:
            rt = _read_columns(rej_path, REJECT_COLUMNS)
            if rt.num_rows != s["rejected"]:
                errors.append(f"{s['rejects']}: {rt.num_rows} rows, manifest.json says {s['rejected']} rejected")
            facts.rejected += rt.num_rows
            rcols = {c: rt.column(c).to_pylist() for c in rt.column_names}
            for stage, reason in zip(rcols.get("stage", []), rcols.get("reason", [])):
                reasons[stage][reason] += 1
            for col, (_, _, _, own_stage, _) in SCORE_SPECS.items():
                if col not in rcols:
                    continue
                here = [v for st, v in zip(rcols["stage"], rcols[col]) if st == own_stage and v is not None]
                elsewhere = [v for st, v in zip(rcols["stage"], rcols[col]) if st != own_stage and v is not None]
                facts.scores[col].add("rejected_here", here)
                facts.scores[col].add("rejected_elsewhere", elsewhere)
                facts.score_non_null[col] += len(here) + len(elsewhere)
        tar_name = s["tar"].rsplit("/", 1)[-1]
        if tar_name in on_disk["shards"]:
            if on_disk["shards"][tar_name] != s.get("bytes"):
                errors.append(f"{s['tar']}: {on_disk['shards'][tar_name]} bytes on disk, manifest.json says {s.get('bytes')}")
            elif verify_tars:
                with FileSystems.open(tar_path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
                if keys != set(uids):
                    errors.append(f"{s['tar']}: holds {len(keys)} samples, meta parquet lists {len(uids)} "
                                  f"({len(keys - set(uids))} only in the tar, {len(set(uids) - keys)} only in the meta)")
        facts.shards.append(row)

    facts.reasons = {st: dict(sorted(r.items())) for st, r in reasons.items()}
    facts.input_rows = facts.kept + facts.rejected
    facts.samples = sorted((n.entry for n in heap), key=lambda e: e[0])
    facts.samples_screened = any_punsafe
    if not any_punsafe and not unscreened_samples:
        facts.samples = []  # no NSFW scores: a public card shows no unscreened web images by default

    # Cross-checks against stats.json and manifest.json.
    st_input = stats.get("input", {}).get("rows")
    if st_input != facts.input_rows:
        errors.append(f"stats.json: input rows {st_input}, but the files hold {facts.kept} kept + {facts.rejected} rejected = {facts.input_rows}")
    if stats.get("kept") != facts.kept:
        errors.append(f"stats.json: kept {stats.get('kept')}, meta parquet files hold {facts.kept} rows")
    if stats.get("rejected") != facts.rejected:
        errors.append(f"stats.json: rejected {stats.get('rejected')}, rejects parquet files hold {facts.rejected} rows")
    if manifest.get("samples") != facts.kept:
        errors.append(f"manifest.json: samples {manifest.get('samples')}, meta parquet files hold {facts.kept} rows")
    if manifest.get("num_shards") != len(manifest.get("shards", [])) or stats.get("num_shards") != len(manifest.get("shards", [])):
        errors.append(f"shard count: manifest.json num_shards {manifest.get('num_shards')}, lists {len(manifest.get('shards', []))}, stats.json says {stats.get('num_shards')}")
    if not (stats.get("accounting") or {}).get("ok"):
        errors.append("stats.json: the run's own accounting did not pass (accounting.ok is not true)")
    unknown_stages = sorted(set(facts.reasons) - set(STAGES))
    if unknown_stages:
        errors.append(f"rejects parquet: unknown stages {unknown_stages}")
    footers = {0: {"rejects_by_reason": facts.reasons}}
    facts.funnel = funnel_from(st_input if isinstance(st_input, int) else facts.input_rows, footers, stats.get("stage_modes"))
    if _funnel_key(facts.funnel) != _funnel_key(stats.get("funnel", [])):
        want = {f["stage"]: (f["in"], f["out"], f["rejected"], f["reasons"]) for f in stats.get("funnel", [])}
        got = {f["stage"]: (f["in"], f["out"], f["rejected"], f["reasons"]) for f in facts.funnel}
        diffs = [f"{st}: stats.json {want.get(st)} vs rejects files {got.get(st)}" for st in STAGES if want.get(st) != got.get(st)]
        errors.append("funnel differs from the rejects files (stage: (in, out, rejected, reasons)): " + "; ".join(diffs))
    if errors:
        raise CardError(f"{dataset_dir}: the dataset's files disagree with its stats/manifest; no card written:\n  " + "\n  ".join(errors))
    return facts


class _Neg:
    """Heap entry ordered so the heap's top is the largest rank (we keep the smallest ranks)."""

    __slots__ = ("entry",)

    def __init__(self, entry):
        self.entry = entry

    def __lt__(self, other):
        return self.entry[0] > other.entry[0]


def _funnel_key(funnel: list) -> list:
    return [(f["stage"], f["in"], f["out"], f["rejected"], dict(sorted(f["reasons"].items()))) for f in funnel]


# -- plots -----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No Software/date metadata: the same data gives the same bytes.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


SERIES_STYLE = {
    "kept": ("kept", "tab:green"),
    "rejected_here": ("rejected by this filter", "tab:red"),
    "rejected_elsewhere": ("rejected at another stage", "tab:gray"),
}


def plot_score(h: FloatHist, title: str, xlabel: str, threshold: float | None, threshold_label: str) -> bytes:
    _load_heavy()
    plt = _plt()
    total = sum(h.counts.values())
    nz = np.nonzero(total)[0]
    lo_i, hi_i = int(nz[0]), int(nz[-1]) + 1
    if threshold is not None:
        t_i = int(np.clip((threshold - h.lo) / h.width, 0, h.bins - 1))
        lo_i, hi_i = min(lo_i, t_i), max(hi_i, t_i + 1)
    factor = max(1, -(-(hi_i - lo_i) // 50))  # at most ~50 bars
    lo_i -= lo_i % factor
    n_bars = -(-(hi_i - lo_i) // factor)
    edges = h.lo + np.arange(lo_i, lo_i + n_bars * factor + 1, factor) * h.width
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key, (label, color) in SERIES_STYLE.items():
        seg = h.counts[key][lo_i:lo_i + n_bars * factor]
        if seg.sum() == 0:
            continue
        c = np.zeros(n_bars * factor, np.int64)
        c[: len(seg)] = seg
        c = c.reshape(n_bars, factor).sum(axis=1)
        ax.stairs(c, edges, label=f"{label} (n={int(c.sum()):,})", color=color, fill=key == "kept", alpha=0.45 if key == "kept" else 1.0, linewidth=1.5)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=threshold_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_int_hist(h: IntHist, title: str, xlabel: str, marks: list[tuple[float, str]], log_x: bool = False) -> bytes:
    _load_heavy()
    plt = _plt()
    nz = np.nonzero(h.counts)[0]
    hi = int(nz[-1]) + 1
    factor = max(1, -(-hi // 60))
    hi = -(-hi // factor) * factor
    counts = np.pad(h.counts[:hi], (0, max(0, hi - len(h.counts[:hi])))).reshape(-1, factor).sum(axis=1)
    edges = np.arange(0, hi + 1, factor)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.6, label=f"kept (n={h.n:,})")
    for x, label in marks:
        ax.axvline(x, linestyle="--", linewidth=1.2, color="black")
        ax.annotate(label, (x, ax.get_ylim()[1] * 0.9), rotation=90, fontsize=7, ha="right", va="top")
    if log_x:
        ax.set_xscale("symlog")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_image_sizes(facts: Facts, image_size: int | None) -> bytes:
    _load_heavy()
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    h = facts.shorter_side
    top = int(np.nonzero(h.counts)[0][-1]) + 1
    # log-spaced integer bins [edges[i], edges[i+1]) px from 1 to the largest side
    edges = np.unique(np.concatenate([np.geomspace(1, top, 50).astype(np.int64), [top + 1]]))
    counts = np.add.reduceat(h.counts[: edges[-1]], edges[:-1])
    a1.stairs(counts, edges, fill=True, alpha=0.6, color="tab:blue", label=f"kept (n={h.n:,})")
    for x in (64, 256, 1024):
        a1.axvline(x, linestyle=":", color="black", linewidth=1)
        a1.annotate(f"≥{x}: {h.at_least(x):,}", (x, 0), xytext=(3, 30), textcoords="offset points", rotation=90, fontsize=7)
    if image_size:
        a1.axvline(image_size, linestyle="--", color="tab:red", linewidth=1.2, label=f"--image-size {image_size}")
    a1.set_xscale("log")
    a1.set_xlim(left=16)
    a1.set_xlabel("shorter side of the downloaded image, px (log)")
    a1.set_ylabel("samples")
    a1.set_title("Original image size (kept)")
    a1.legend(fontsize=8)
    a2.pcolormesh(_wh_edges(), _wh_edges(), np.log10(1 + facts.wh.T), cmap="viridis")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("width, px")
    a2.set_ylabel("height, px")
    a2.set_title("width × height (log10(1 + count))")
    fig.tight_layout()
    return _png(fig)


def plot_samples(facts: Facts) -> bytes:
    _load_heavy()
    from PIL import Image

    plt = _plt()
    picks = facts.samples
    cols = 4
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.1), squeeze=False)
    by_tar = collections.defaultdict(list)
    for i, (_, uid, tar_rel, _, _) in enumerate(picks):
        by_tar[tar_rel].append((i, uid))
    images = {}
    for tar_rel, items in sorted(by_tar.items()):
        with FileSystems.open(_join(facts.dataset_dir, tar_rel)) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for i, uid in items:
                for ext in IMAGE_EXTS:
                    m = members.get(f"{uid}.{ext}")
                    if m is not None:
                        images[i] = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                        break
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(picks):
            continue
        if k in images:
            ax.imshow(np.asarray(images[k]))
        caption = picks[k][3]
        if len(caption) > 110:
            caption = caption[:107] + "..."
        lines = textwrap.wrap(caption, 34)
        if len(lines) > 3:
            lines = lines[:3]
            lines[-1] = lines[-1][:31] + "..."
        ax.set_title("\n".join(lines), fontsize=7)
    fig.tight_layout()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs a caption uses that the font lacks
        return _png(fig)


# -- the card --------------------------------------------------------------------------------------


def licence_metadata(facts: Facts) -> tuple[dict, str]:
    """(YAML licence fields, a sentence for the card)."""
    if not facts.has_license_column or not facts.kept:
        return {"license": "unknown"}, "The input has no LICENSE column: the licence of the images and captions is unknown."
    ids = collections.Counter()
    for value, n in facts.licences.items():
        v = str(value).strip().lower()
        ids["unknown" if v in UNKNOWN_LICENSE_VALUES or value == "(null)" else (hf_license_id(value) or "other")] += n
    if len(ids) == 1:
        only = next(iter(ids))
        return {"license": only}, f"Every kept sample's LICENSE value maps to `{only}`."
    mix = ", ".join(f"{k} {_pct(n, facts.kept)}" for k, n in sorted(ids.items(), key=lambda kv: (-kv[1], kv[0])))
    details = (f"Per-sample licences from the source metadata's LICENSE column, as declared by the source and not "
               f"verified: {mix} of {facts.kept} samples. See the card's licence table.")
    return ({"license": "other", "license_name": "kiln-per-sample-mix", "license_link": CARD_NAME, "license_details": details},
            f"The samples carry different licences (mix: {mix}), so the dataset is marked `other`; each sample's own LICENSE value is in its metadata.")


def card_metadata(facts: Facts, language: list[str] | None, pretty_name: str) -> dict:
    lic, _ = licence_metadata(facts)
    modes = facts.stats.get("stage_modes", {})
    langs = language
    if not langs:
        found = [code for code, n in facts.languages.most_common() if LANGUAGE_CODE.match(str(code)) and n >= 0.01 * max(1, facts.kept)]
        langs = sorted(found) or ["en"]
    tags = ["kiln", "webdataset", "image-text-pairs", "laion-format"]
    if modes.get("clip") == "filter":
        tags.append("clip-filtered")
    if modes.get("t5") == "embed":
        tags.append("t5-embeddings")
    meta = {
        **lic,
        "language": langs,
        "multilinguality": "monolingual" if len(langs) == 1 else "multilingual",
        "language_creators": ["found"],
        "annotations_creators": ["machine-generated"],
        "task_categories": ["text-to-image"],
        "size_categories": [size_category(facts.kept)],
        "pretty_name": pretty_name,
        "tags": tags,
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}],
    }
    return meta


def validate_card_metadata(meta: dict) -> list[str]:
    """Offline checks of the Hub's dataset-card metadata rules for the fields kiln writes.
    (`DatasetCard.validate()` posts the card to the Hub's API; this never touches the network.)"""
    problems = []
    lic = meta.get("license")
    for v in lic if isinstance(lic, list) else [lic]:
        if v not in HF_LICENSES:
            problems.append(f"license {v!r} is not a Hub licence id")
    if lic == "other" and not LICENSE_NAME.match(str(meta.get("license_name", ""))):
        problems.append("license: other needs a license_name like 'my-license-1.0'")
    for code in meta.get("language", []):
        if not LANGUAGE_CODE.match(str(code)):
            problems.append(f"language {code!r} is not an ISO 639-1/2/3 code")
    for cat in meta.get("size_categories", []):
        if cat not in SIZE_CATEGORIES:
            problems.append(f"size_categories {cat!r} is not one of {SIZE_CATEGORIES}")
    for cat in meta.get("task_categories", []):
        if cat not in TASK_CATEGORIES:
            problems.append(f"task_categories {cat!r} is not a Hub task")
    for key in ("annotations_creators", "language_creators"):
        for v in meta.get(key, []):
            if v not in CREATORS:
                problems.append(f"{key} {v!r} is not one of {sorted(CREATORS)}")
    if not isinstance(meta.get("pretty_name"), str) or not meta["pretty_name"].strip():
        problems.append("pretty_name must be a non-empty string")
    if not all(isinstance(t, str) and t for t in meta.get("tags", [])):
        problems.append("tags must be non-empty strings")
    for cfg in meta.get("configs", []):
        if "config_name" not in cfg or not cfg.get("data_files"):
            problems.append(f"configs entry {cfg} needs config_name and data_files")
    return problems


def _prepare_command(flags: dict) -> str:
    """The `kiln prepare` command line that reproduces the run's flags (those off their defaults)."""
    from pipeline.options import add_prepare_args

    p = argparse.ArgumentParser(add_help=False)
    add_prepare_args(p)
    words = ["kiln", "prepare"]
    for action in p._actions:  # noqa: SLF001
        if not action.option_strings or action.dest not in flags:
            continue
        value = flags[action.dest]
        opt = action.option_strings[0]
        if action.dest in ("quiet", "overwrite"):
            continue  # how the run behaved, not what it produced
        if action.dest not in ("input", "output") and value == action.default:
            continue
        if action.nargs == 0:
            if value != action.default:
                words.append(opt)
            continue
        words += [opt, shlex.quote(str(value))]
    return " ".join(words)


def _score_summary(h: FloatHist, series: str = "kept") -> str:
    if not h.n(series):
        return "no values"
    return (f"n={h.n(series):,}, mean {_fmt(h.mean(series))}, median ≈ {_fmt(h.quantile(series, 0.5), 3)}, "
            f"5th–95th percentile ≈ {_fmt(h.quantile(series, 0.05), 3)}–{_fmt(h.quantile(series, 0.95), 3)}, "
            f"min {_fmt(h.min[series])}, max {_fmt(h.max[series])}")


def render(facts: Facts, plots: dict[str, str | None], pretty_name: str, seed: int, language: list[str] | None) -> str:
    """The card's Markdown body (without the YAML block). `plots`: name -> relative path, or the
    reason the plot was skipped."""
    st = facts.stats
    flags = st.get("flags", {})
    modes = st.get("stage_modes", {})
    models = st.get("models", {})
    n_in, kept, rej = facts.input_rows, facts.kept, facts.rejected
    beam_opts = st.get("beam_options") or {}
    runner = beam_opts.get("runner") or "DirectRunner (Beam's default)"
    _, lic_sentence = licence_metadata(facts)
    out: list[str] = []
    w = out.append

    def plot(name: str, alt: str) -> None:
        ref = plots.get(name)
        if ref and ref.endswith(".png"):
            w(f"![{alt}]({ref})\n")
        else:
            w(f"*Plot skipped: {ref or 'no data'}.*\n")

    w(f"# {pretty_name}\n")
    w(f"Image–caption pairs prepared by kiln `{st.get('kiln_version')}` "
      f"(commit `{st.get('git_commit') or 'unknown'}`) from {n_in:,} input rows of web metadata: "
      f"**{kept:,} kept ({_pct(kept, n_in)})**, {rej:,} rejected, each with a stage and a reason. "
      f"The run started {st.get('started_at')} and finished {st.get('finished_at')} "
      f"({st.get('duration_s')} s). `stats.json` beside this card is its machine-readable twin; "
      f"the file layout is kiln's SHARDS.md (webdataset tars + Parquet).\n")
    w("This card follows *Datasheets for Datasets* (Gebru et al., 2021). Its numbers were recounted "
      "from the shard, metadata and rejects files when the card was written and checked against "
      "`stats.json` and `manifest.json`.\n")

    # -- Motivation
    w("## Motivation\n")
    w("- **Purpose.** Training data for text-to-image diffusion models in the style of Imagen "
      "(Saharia et al., 2022): images with their alt-text captions, "
      + ("and each caption's frozen T5 text-encoder embedding precomputed (so a trainer never loads the encoder)."
         if modes.get("t5") == "embed" else "without precomputed text embeddings (`--t5 off`).")
      + "\n- **Who created it, and who funded it:** not recorded by the run; the person publishing "
      "this card should add it here.\n- **Source.** The input metadata files listed under "
      "*Collection process*; their rows point at images on the public web that kiln downloaded.\n")

    # -- Composition
    w("## Composition\n")
    w(f"- **Instances:** {kept:,} image–caption pairs in {len(facts.shards):,} shard(s). Each sample has "
      "a stored image (`KEY.jpg`/`.png`/`.webp`), its caption (`KEY.txt`), its metadata (`KEY.json`: "
      "every input column plus kiln's scores, sizes, hashes and provenance)"
      + (", and its T5 embedding (`KEY.t5.npy`)" if modes.get("t5") == "embed" else "")
      + ". `meta/NNNNNN.parquet` holds the same metadata one row per sample; `rejects/NNNNNN.parquet` "
      f"holds the {rej:,} rejected input rows with their stage, reason and scores.\n"
      f"- **Size on disk:** tars {facts.bytes_by_kind.get('shards', 0):,} bytes, meta parquet "
      f"{facts.bytes_by_kind.get('meta', 0):,} bytes, rejects parquet {facts.bytes_by_kind.get('rejects', 0):,} bytes; "
      f"stored images {facts.image_bytes:,} bytes in total"
      + (f" ({facts.image_bytes / kept / 1024:.1f} KiB per sample on average)" if kept else "") + ".\n"
      "- **Is it a sample?** It is what survived the filters below out of the input rows; the input "
      "itself is whatever metadata was given (for LAION-400M, a CLIP-filtered crawl of Common Crawl).\n"
      "- **Labels:** none beyond the found alt-text captions and the machine-generated scores.\n")
    if facts.formats:
        w("- **Source image formats:** " + ", ".join(f"{k} {n:,}" for k, n in sorted(facts.formats.items(), key=lambda kv: (-kv[1], kv[0]))) + ".\n")
    ss, sd = facts.shorter_side, facts.stored_side
    if ss.n:
        w(f"- **Image sizes:** downloaded images' shorter side median {ss.quantile(0.5)} px "
          f"(5th–95th percentile {ss.quantile(0.05)}–{ss.quantile(0.95)} px); samples at least 64 px: "
          f"{ss.at_least(64):,}, at least 256 px: {ss.at_least(256):,} ({_pct(ss.at_least(256), kept)}), "
          f"at least 1024 px: {ss.at_least(1024):,} ({_pct(ss.at_least(1024), kept)}). Stored images are "
          f"square at min(shorter side, --image-size {flags.get('image_size')}) px, never upscaled"
          + (" (upscaling was allowed in this run)" if flags.get("allow_upscale") else "")
          + f": stored side median {sd.quantile(0.5)} px.\n")
    plot("image_sizes", "Original image sizes of kept samples")
    cc = facts.caption_chars
    if cc.n:
        w(f"- **Captions:** {cc.n:,} captions, length median {cc.quantile(0.5)} characters "
          f"(5th–95th percentile {cc.quantile(0.05)}–{cc.quantile(0.95)}, max {cc.max}); the prefilter "
          f"kept {flags.get('min_caption_chars')}–{flags.get('max_caption_chars')} characters.\n")
    plot("caption_chars", "Caption lengths in characters")
    if facts.t5_len.n:
        t5m = models.get("t5", {})
        w(f"- **T5 embeddings:** {facts.t5_len.n:,} captions embedded, length median "
          f"{facts.t5_len.quantile(0.5)} tokens (5th–95th percentile {facts.t5_len.quantile(0.05)}–"
          f"{facts.t5_len.quantile(0.95)}, EOS included); {facts.t5_truncated:,} captions "
          f"({_pct(facts.t5_truncated, kept)}) were cut at --t5-max-length {flags.get('t5_max_length')}. "
          f"Each embedding is float16 `[t5_len, {t5m.get('d_model')}]`, unpadded.\n")
    plot("t5_len", "T5 token lengths")
    w("### Licences (LICENSE column of the kept rows)\n")
    w(lic_sentence + " The LICENSE value is what the source metadata declares for the page or "
      "image; kiln did not verify it.\n")
    if facts.has_license_column:
        w("| LICENSE value | Hub licence id | samples | share |\n| --- | --- | ---: | ---: |")
        for value, n in sorted(facts.licences.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            v = str(value).strip().lower()
            hub = "unknown" if v in UNKNOWN_LICENSE_VALUES or value == "(null)" else (hf_license_id(value) or "other")
            w(f"| `{_md(value)}` | {hub} | {n:,} | {_pct(n, kept)} |")
        w("")
    w("### Top source domains (host of URL, kept rows)\n")
    w("| domain | samples | share |\n| --- | ---: | ---: |")
    for dom, n in sorted(facts.domains.items(), key=lambda kv: (-kv[1], kv[0]))[:10]:
        w(f"| {_md(dom)} | {n:,} | {_pct(n, kept)} |")
    w(f"\n{len(facts.domains):,} distinct domains in all.\n")
    if facts.languages:
        w("### Languages (LANGUAGE column of the kept rows)\n")
        w("| language | samples | share |\n| --- | ---: | ---: |")
        for code, n in sorted(facts.languages.items(), key=lambda kv: (-kv[1], str(kv[0])))[:10]:
            w(f"| {_md(code)} | {n:,} | {_pct(n, kept)} |")
        w("")
    else:
        w(f"**Language:** declared as {', '.join(language or ['en'])} by whoever wrote this card; the input has "
          "no LANGUAGE column and kiln does not detect languages.\n")
    w("### Samples\n")
    if facts.samples:
        screen = (f"Only samples whose punsafe is at most {facts.max_sample_punsafe} and whose caption toxicity is at most 0.5 are eligible."
                  if facts.samples_screened else
                  "**These samples were not screened by an NSFW model (it was off for this run).**")
        w(f"{len(facts.samples)} kept samples, chosen by the smallest sha256(\"{seed}:uid\") — a seeded "
          f"pseudo-random pick that is the same every time this card is written. {screen}\n")
    plot("samples", "A grid of kept samples with their captions")

    # -- Collection process
    w("## Collection process\n")
    files = st.get("input", {}).get("files", [])
    w(f"- **Input:** `{_md(st.get('input', {}).get('pattern'))}`, {len(files)} file(s), {n_in:,} rows:")
    for f in files[:20]:
        w(f"  - `{_md(f.get('path'))}`: {f.get('rows'):,} rows, {f.get('bytes'):,} bytes")
    if len(files) > 20:
        w(f"  - ... and {len(files) - 20} more (all in stats.json)")
    w("")
    w(f"- **Download:** each URL fetched once by kiln's fetcher: http/https only; no private, "
      f"loopback, link-local or metadata addresses (allowed exceptions: `{_md(flags.get('allow_hosts') or 'none')}`); "
      f"every redirect re-checked (at most {flags.get('max_redirects')}); at most {flags.get('max_bytes'):,} bytes "
      f"and {flags.get('download_timeout')} s per URL, {flags.get('retries')} retries on 429/5xx honouring "
      f"Retry-After; User-Agent token `{_md(flags.get('user_agent_token'))}`.\n"
      f"- **When:** {st.get('started_at')} to {st.get('finished_at')}. Web content changes: a later "
      "run over the same metadata downloads different bytes for some URLs (link rot, edits).\n")
    w("### Opt-out handling\n")
    directives = [d.strip().lower() for d in str(flags.get("disallowed_directives", "")).split(",") if d.strip()]
    dl = facts.reasons.get("download", {})
    w("kiln honours `X-Robots-Tag` response headers, bare or scoped to its user-agent token "
      f"(`{_md(flags.get('user_agent_token'))}: noai`); a header naming one of the directives below removes "
      "the row (`none` counts as `noindex`). It does not read robots.txt, TDM reservation protocols "
      "or other opt-out registries: an opt-out expressed only there was **not** honoured.\n")
    w("| directive honoured | rows removed | share of input |\n| --- | ---: | ---: |")
    for d in directives:
        n = dl.get(f"robots_{d}", 0)
        w(f"| `{_md(d)}` | {n:,} | {_pct(n, n_in)} |")
    extra = {r: n for r, n in dl.items() if r.startswith("robots_") and r[len("robots_"):] not in directives}
    for r, n in sorted(extra.items()):
        w(f"| `{_md(r[len('robots_'):])}` | {n:,} | {_pct(n, n_in)} |")
    w("")
    w("### How the job ran\n")
    w(f"- **Runner:** {runner}; Beam options: "
      + (", ".join(f"`--{k}={_md(v)}`" for k, v in sorted(beam_opts.items())) if beam_opts else "Beam's defaults")
      + ".\n- **Versions:** " + ", ".join(f"{k} {v}" for k, v in sorted(st.get("versions", {}).items()))
      + f".\n- **kiln:** {st.get('kiln_version')}, git commit `{st.get('git_commit') or 'unknown'}`, "
      f"configuration fingerprint `{st.get('config_fingerprint')}`.\n")
    this_run = st.get("this_run", {})
    busy = this_run.get("stage_busy_s") or {}
    if busy:
        w("- **Busy time per stage (summed over workers, this run):** " + ", ".join(f"{k} {v:,.1f} s" for k, v in sorted(busy.items())) + ".\n")
    if this_run.get("shards_skipped"):
        w(f"- This run resumed an earlier one: {this_run['shards_skipped']} complete shard(s) were kept from it.\n")

    # -- Preprocessing and filtering
    w("## Preprocessing and filtering\n")
    w("Every input row ended in exactly one place: a shard, or the rejects table with a stage and a "
      f"reason. **{n_in:,} input rows = {kept:,} kept + {rej:,} rejected.** Stages run cheapest first; a "
      "stage in `score` mode records its scores and rejects nothing.\n")
    w("### Funnel\n")
    w("| stage | mode | in | out | rejected | % of input | % of stage input |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for f in facts.funnel:
        w(f"| {f['stage']} | {f['mode']} | {f['in']:,} | {f['out']:,} | {f['rejected']:,} | {_pct(f['rejected'], n_in)} | {_pct(f['rejected'], f['in'])} |")
    w(f"| **kept** | | {n_in:,} | {kept:,} | {rej:,} | {_pct(kept, n_in)} kept | |\n")
    w("### Reject reasons\n")
    w("| stage | reason | rows | % of input |\n| --- | --- | ---: | ---: |")
    for f in facts.funnel:
        for reason, n in sorted(f["reasons"].items(), key=lambda kv: (-kv[1], kv[0])):
            w(f"| {f['stage']} | {reason} | {n:,} | {_pct(n, n_in)} |")
    w("")
    w("### Model filters and their score distributions\n")
    specs = [
        ("toxicity", "toxicity", "max_toxicity", "Caption toxicity (Detoxify)", "max over the chosen labels", "reject above"),
        ("clip_similarity", "clip", "min_clip_similarity", "CLIP image–caption similarity", "cosine similarity", "reject below"),
        ("punsafe", "nsfw", "max_punsafe", "NSFW head on the CLIP image embedding", "punsafe", "reject above"),
    ]
    for col, stage, flag, title, xlabel, direction in specs:
        mode = modes.get(stage, "off")
        w(f"- **{title}** — mode `{mode}`, threshold `--{flag.replace('_', '-')} {flags.get(flag)}` ({direction}"
          + ("" if mode == "filter" else "; not applied in this mode") + f"). Kept: {_score_summary(facts.scores[col])}.")
    w("")
    for col, stage, _flag, title, _x, _d in specs:
        plot(col, f"{title} distribution with its threshold")
    w("### Every flag of the run\n")
    w("| flag | value |\n| --- | --- |")
    for k, v in sorted(flags.items()):
        w(f"| `--{k.replace('_', '-')}` | `{_md(v)}` |")
    w("")
    w("Stage modes: " + ", ".join(f"{k} `{v}`" for k, v in modes.items()) + ".\n")
    w("To reproduce (same input files, same models, same kiln commit):\n")
    w("```\n" + _prepare_command(flags) + (" " + " ".join(f"--{k}={v}" for k, v in sorted(beam_opts.items())) if beam_opts else "") + "\n```\n")
    w("### Models\n")
    if not models:
        w("No models were used (every model stage was off).\n")
    for name, info in sorted(models.items()):
        w(f"- **{name}**: sha256 `{info.get('sha256')}`")
        for k, v in sorted(info.items()):
            if k != "sha256":
                w(f"  - {k}: `{_md(v)}`")
    w("")

    # -- Uses
    w("## Uses\n")
    w("- **Intended:** training and evaluating text-to-image models (a cascaded diffusion model: the "
      "64 px base stage on every sample, super-resolution stages only on samples at least as large as "
      "their output), and research on data filtering, using the per-sample scores to re-threshold.\n"
      "- **Not suitable for:** identifying or profiling people; any use that needs the consent of the "
      "people depicted or a cleared copyright status; measuring demographic fairness (the composition "
      "is unknown, see below); use as a safety-vetted or child-safe image set; applications that need "
      "captions to be accurate descriptions (alt-text is often not).\n"
      "- **Before use,** read the limitations below and check your jurisdiction's rules on text and "
      "data mining and on the images' licences.\n")

    # -- Distribution
    w("## Distribution\n")
    w(f"- **Format:** {len(facts.shards):,} webdataset tar shard(s) with Parquet metadata and rejects, "
      "`manifest.json` with every shard's sha256 and sample count, `stats.json`, this card and its "
      "plots. The Hub's default config reads `shards/*.tar` as webdataset.\n"
      f"- **Licence:** {lic_sentence} Images remain the property of their rights holders; the "
      "LICENSE column is not a grant from them.\n"
      "- **Takedown:** a sample is removed by deleting its rows and tar members and rewriting its "
      "shard's files and the manifest; the `uid` (sha256 of URL and caption) identifies it.\n")

    # -- Maintenance
    w("## Maintenance\n")
    w("- **Reproducibility:** re-running the command above over the same input files with the same "
      "models gives byte-identical shards for every URL whose bytes did not change (shards are uid "
      "ranges, tar members are sorted with fixed mtimes, the manifest has no timestamps). "
      f"This dataset's configuration fingerprint is `{st.get('config_fingerprint')}`.\n"
      "- **Updates and contact:** not recorded by the run; the publisher should state who maintains "
      "the copy and how to report problems or request removal.\n"
      "- **Regenerate this card:** `kiln card DATASET_DIR` (it re-checks the files first).\n")

    # -- Limitations
    w("## Known limitations and biases\n")
    lim = []
    if modes.get("clip") != "off":
        lim.append(
            "**CLIP filtering is value-laden.** The similarity filter keeps captions that read the way "
            "CLIP's own web training data reads. Hong et al. (2024) audit CLIP filtering and find that data "
            "relating to several imputed demographic groups (LGBTQ+ people, older women, younger men) is "
            "excluded at higher rates, amplifying under-representation already present in the crawl; "
            "Pouget et al. (2024) show that filtering towards English image–text pairs hurts the "
            "representation of lower-income and non-Western communities; Radford et al. (2021, §7) report "
            "CLIP's own demographic biases. Birhane, Prabhu and Kahembwe (2021) document misogyny, "
            "pornography and malignant stereotypes that survived CLIP filtering in LAION-400M, and the "
            "LAION-5B paper (Schuhmann et al., 2022) discusses the same risks for its subsets.")
    if modes.get("toxicity") != "off":
        tox = models.get("toxicity", {})
        lim.append(
            "**Caption toxicity (Detoxify) flags words, not intent.** Its README warns that text with "
            "swearing, insults or profanity is likely to be classified as toxic regardless of tone or "
            "intent (e.g. humorous or self-deprecating), which can bias it against already vulnerable "
            "minority groups, and mentions of identity terms can raise scores: captions about some groups "
            "are removed more often than others."
            + (" The `original` model was trained on English Wikipedia talk-page comments (Jigsaw 2018): "
               "it is English-centric and scores other languages unreliably."
               if str(tox.get("name") or tox.get("spec") or flags.get("toxicity_model")).endswith("original") else "")
            + f" Model used: `{_md(flags.get('toxicity_model'))}`.")
    if modes.get("nsfw") != "off":
        lim.append(
            "**The NSFW head misses things.** It is a small classifier on the CLIP image embedding; Hong et al. "
            "(2024) found that this kind of filter fails to remove sexually explicit content from a CLIP-"
            f"filtered web pool. Punsafe at or below {flags.get('max_punsafe')} does not mean safe: the "
            "dataset may contain nudity, violence and other disturbing images.")
    else:
        lim.append("**No NSFW filter ran** (`--nsfw off`): the dataset is likely to contain sexual and violent imagery.")
    lim += [
        "**Alt-text is noisy.** Captions are whatever the page's alt attribute said: SEO keywords, file "
        "names, text unrelated to the image, and text that reproduces stereotypes. "
        + ("CLIP filtering removes some mismatches, not the rest." if modes.get("clip") == "filter"
           else "No CLIP filter removed mismatched captions in this run."),
        "**The web is not the world.** What is online, in English, on crawlable pages and still reachable "
        "at download time over-represents some regions, languages, skin tones, ages and genders; "
        f"{_pct(kept, n_in)} of the input survived here, and link rot removes some sites more than others.",
        "**People and private data.** Images may show identifiable people, including minors, and "
        "personal information (faces, names in captions, documents); nothing in this pipeline detects "
        "or removes it.",
        "**No screening against known abuse material.** kiln does not match images against hash lists "
        "of known child sexual abuse material. LAION withdrew its datasets (LAION-5B among them) in "
        "December 2023 after links to such material were found in LAION-5B (Thiel, 2023); build from "
        "metadata that has been cleaned of them (e.g. Re-LAION-5B) and screen with a hash-matching "
        "service before publishing or training.",
    ]
    for item in lim:
        w(f"- {item}")
    w("")
    w("### Questions this card cannot answer\n")
    for q in (
        "Did the people depicted consent to being photographed, published, or used to train models? Unknown.",
        "What is each image's copyright status? Only the source's LICENSE column is known (see the licence table); it is unverified, and '?' means unknown.",
        "What is the demographic composition (gender, age, skin tone, region, language) of the people and places shown? Not measured.",
        "How many images show minors, private individuals, or personal data? Not measured.",
        "Which images are duplicates or near-duplicates of each other? Only exact (URL, caption) duplicates were removed.",
        "What did the rejected rows look like? Their URLs, scores and reasons are in rejects/, but their images were not stored.",
        "Who created, funded and maintains this copy of the data? Not recorded by the run.",
    ):
        w(f"- {q}")
    w("")
    w("## References\n")
    for ref in (
        "Gebru, Morgenstern, Vecchione, Vaughan, Wallach, Daumé III, Crawford. *Datasheets for Datasets.* Communications of the ACM 64(12), 2021. arXiv:1803.09010.",
        "Birhane, Prabhu, Kahembwe. *Multimodal datasets: misogyny, pornography, and malignant stereotypes.* arXiv:2110.01963, 2021.",
        "Hong, Agnew, Kohno, Morgenstern. *Who's in and who's out? A case study of multimodal CLIP-filtering in DataComp.* EAAMO 2024. doi:10.1145/3689904.3694702.",
        "Pouget, Beyer, Bugliarello, Wang, Steiner, Zhai, Alabdulmohsin. *No Filter: Cultural and Socioeconomic Diversity in Contrastive Vision-Language Models.* NeurIPS 2024.",
        "Radford et al. *Learning Transferable Visual Models From Natural Language Supervision* (CLIP). ICML 2021, §7.",
        "Schuhmann et al. *LAION-400M: Open Dataset of CLIP-Filtered 400 Million Image-Text Pairs.* arXiv:2111.02114, 2021.",
        "Schuhmann et al. *LAION-5B: An open large-scale dataset for training next generation image-text models.* NeurIPS 2022 Datasets and Benchmarks.",
        "Saharia et al. *Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding* (Imagen). NeurIPS 2022.",
        "Thiel. *Identifying and Eliminating CSAM in Generative ML Training Data and Models.* Stanford Internet Observatory, December 2023.",
        "Hanu and Unitary team. *Detoxify*, README, section \"Limitations and ethical considerations\". https://github.com/unitaryai/detoxify",
    ):
        w(f"- {ref}")
    return "\n".join(out).rstrip() + "\n"


def _plots(facts: Facts, seed: int) -> dict[str, tuple[bytes | None, str | None]]:
    """name -> (png bytes, None) or (None, why it was skipped)."""
    flags, modes = facts.stats.get("flags", {}), facts.stats.get("stage_modes", {})
    out = {}
    for col, (_, _, _, stage, label) in SCORE_SPECS.items():
        h = facts.scores[col]
        if modes.get(stage, "off") == "off" or not facts.score_non_null[col]:
            out[col] = (None, f"the {label} stage was off in this run, so the `{col}` column is null")
            continue
        flag = {"clip_similarity": "min_clip_similarity", "punsafe": "max_punsafe", "toxicity": "max_toxicity"}[col]
        thr = flags.get(flag)
        thr_label = f"--{flag.replace('_', '-')} {thr}" + ("" if modes.get(stage) == "filter" else " (score mode: not applied)")
        out[col] = (plot_score(h, f"{col}: kept and rejected rows", col, thr, thr_label), None)
    if facts.shorter_side.n:
        out["image_sizes"] = (plot_image_sizes(facts, flags.get("image_size")), None)
    else:
        out["image_sizes"] = (None, "no kept samples")
    if facts.caption_chars.n:
        marks = [(flags.get("min_caption_chars"), "--min-caption-chars"), (flags.get("max_caption_chars"), "--max-caption-chars")]
        out["caption_chars"] = (plot_int_hist(facts.caption_chars, "Caption length (kept)", "characters", [(x, lab) for x, lab in marks if x is not None]), None)
    else:
        out["caption_chars"] = (None, "no kept samples")
    if modes.get("t5") == "embed" and facts.t5_len.n:
        marks = [(flags.get("t5_max_length"), "--t5-max-length")] if flags.get("t5_max_length") else []
        out["t5_len"] = (plot_int_hist(facts.t5_len, "T5 tokens per caption (kept, EOS included)", "tokens", marks), None)
    else:
        out["t5_len"] = (None, "the T5 stage was off in this run (`--t5 off`), so the `t5_len` column is null")
    if facts.samples:
        out["samples"] = (plot_samples(facts), None)
    elif not facts.samples_screened and facts.kept and not facts.unscreened_samples:
        out["samples"] = (None, "no sample grid: the NSFW stage was off, so no image was screened before being shown "
                                "here (`kiln card --unscreened-samples` draws one anyway)")
    else:
        out["samples"] = (None, "no kept samples eligible for the grid")
    return out


def build_card(dataset_dir: str, *, seed: int = 0, n_samples: int = 16, language: list[str] | None = None,
               pretty_name: str | None = None, verify_tars: bool | None = None,
               unscreened_samples: bool = False) -> tuple[str, dict[str, bytes], dict]:
    """(README.md text, {relative plot path: png bytes}, metadata) for a dataset; writes nothing."""
    from huggingface_hub import DatasetCard, DatasetCardData

    _load_heavy()
    dataset_dir = str(dataset_dir).rstrip("/")
    facts = collect(dataset_dir, seed=seed, n_samples=n_samples, verify_tars=verify_tars, unscreened_samples=unscreened_samples)
    name = pretty_name or f"{dataset_dir.rsplit('/', 1)[-1]} (kiln image-text pairs)"
    rendered = _plots(facts, seed)
    pngs, refs = {}, {}
    for key, (png, why) in rendered.items():
        if png is None:
            refs[key] = why
        else:
            rel = f"{PLOTS_DIR}/{key}.png"
            pngs[rel], refs[key] = png, rel
    meta = card_metadata(facts, language, name)
    problems = validate_card_metadata(meta)
    if problems:
        raise CardError("card metadata fails the Hub's rules: " + "; ".join(problems))
    data = DatasetCardData(**meta)
    if data.to_dict() != meta:
        raise CardError(f"card metadata does not round-trip through DatasetCardData: {data.to_dict()} != {meta}")
    body = render(facts, refs, name, seed, language)
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    if card.data.to_dict() != meta:
        raise CardError("card metadata does not survive DatasetCard's parser")
    return str(card), pngs, meta


def write_card(dataset_dir, *, seed: int = 0, n_samples: int = 16, language: list[str] | None = None,
               pretty_name: str | None = None, verify_tars: bool | None = None, unscreened_samples: bool = False):
    """Cross-check the dataset, then write DATASET_DIR/README.md and DATASET_DIR/card_plots/*.png.

    Returns the card's path (a Path for a local directory, the URL string otherwise). Raises
    CardError, writing nothing, if the files disagree with stats.json or manifest.json.
    """
    _load_heavy()
    base = str(dataset_dir).rstrip("/")
    text, pngs, _ = build_card(base, seed=seed, n_samples=n_samples, language=language, pretty_name=pretty_name,
                               verify_tars=verify_tars, unscreened_samples=unscreened_samples)
    stale = [m.path for m in match(_join(base, PLOTS_DIR, "*.png")) if m.path.rsplit("/", 1)[-1] not in {p.rsplit("/", 1)[-1] for p in pngs}]
    if stale:
        FileSystems.delete(stale)
    for rel, png in sorted(pngs.items()):
        _write_bytes(_join(base, rel), png)
    out = _join(base, CARD_NAME)
    _write_bytes(out, text.encode("utf-8"))
    return out if "://" in base else Path(out)


# -- `kiln card` -----------------------------------------------------------------------------------


def add_card_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset_dir", help="a finished `kiln prepare` output (local or gs://, s3://)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample grid's pick [0]")
    p.add_argument("--samples", type=int, default=16, help="samples in the grid [16]")
    p.add_argument("--language", default=None, help="comma-separated ISO 639 codes of the captions [from a LANGUAGE column, else en]")
    p.add_argument("--pretty-name", default=None, help="the dataset's display name [DIR (kiln image-text pairs)]")
    p.add_argument("--no-verify-tars", dest="verify_tars", action="store_const", const=False, default=None,
                   help="check tar sizes only, not their member lists (default: list members for local datasets)")
    p.add_argument("--unscreened-samples", action="store_true",
                   help="draw the sample grid even when no NSFW scores exist (--nsfw off); off by default because the card is public")


def main_card(args: argparse.Namespace) -> int:
    language = [x.strip() for x in args.language.split(",") if x.strip()] if args.language else None
    try:
        path = write_card(args.dataset_dir, seed=args.seed, n_samples=args.samples, language=language,
                          pretty_name=args.pretty_name, verify_tars=args.verify_tars,
                          unscreened_samples=args.unscreened_samples)
    except CardError as err:
        print(f"kiln card: FAILED: {err}", file=sys.stderr)
        return 1
    print(f"kiln card: wrote {path} and its plots in {PLOTS_DIR}/")
    return 0
