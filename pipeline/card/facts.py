"""What the card says, read from the dataset: `collect(dataset_dir) -> Facts`.

The counts (kept, rejected, the funnel, every reject reason) are pipeline.accounting's ledger of
the files a reader would read, checked against manifest.json and stats.json through the same check
the finalizer uses; any disagreement raises AccountingError and no card is written. The
distributions (scores, image sizes, caption and T5 lengths, licences, languages, domains) are
streamed shard by shard into fixed-bin histograms and counters, and the sample grid's picks are a
bounded heap, so a LAION-400M-sized output is read in one pass with bounded memory.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.accounting import Ledger, check, read_columns
from pipeline.errors import CardError
from pipeline.records import FIELDS_BY_NAME, SCORE_FIELDS


@dataclass(frozen=True)
class Score:
    """How the card shows one model score. Which columns are scores, and the stage that sets each,
    is pipeline.records' (SCORE_FIELDS, RECORD_FIELDS); this is the rest: its threshold, its range."""

    column: str
    threshold_flag: str  # the stats.json flag holding the filter's threshold
    rejects: str  # the side of the threshold that the filter rejects: "above" or "below"
    lo: float  # the score's range: histogram bins cover [lo, hi]
    hi: float
    bins: int  # fine bins; a plot merges them into at most ~50 bars
    label: str  # short name, as in "the CLIP stage was off"
    title: str  # the card's name for it

    @property
    def stage(self) -> str:
        return FIELDS_BY_NAME[self.column].stage


_SCORES = {s.column: s for s in (
    Score("toxicity", "max_toxicity", "above", 0.0, 1.0, 1000, "toxicity", "Caption toxicity (Detoxify)"),
    Score("clip_similarity", "min_clip_similarity", "below", -1.0, 1.0, 2000, "CLIP", "CLIP image–caption similarity"),
    Score("punsafe", "max_punsafe", "above", 0.0, 1.0, 1000, "NSFW", "NSFW head on the CLIP image embedding"),
)}
# In pipeline.records.SCORE_FIELDS order (stage order); a score added there needs its row above.
SCORES = tuple(_SCORES[name] for name in SCORE_FIELDS)

# kiln's columns read from the meta parquet files (never the embeddings), after the input's URL and
# caption columns (named by the run's --url-col / --caption-col) and the optional LICENSE/LANGUAGE.
OPTIONAL_INPUT_COLUMNS = ("LICENSE", "LANGUAGE")
KILN_META_COLUMNS = ("uid", "original_width", "original_height", "stored_width", "stored_height", "source_format",
                     "image_bytes", "source_bytes", *SCORE_FIELDS, "t5_len", "t5_truncated")
REJECT_COLUMNS = ("stage", "reason", *SCORE_FIELDS)
BLOCKLIST_REASON_PREFIX = "blocklist_"  # pipeline.consent's: every blocklist_* reason, whatever its stage
NO_HOST = "(no host)"
WH_BINS = 40  # log-spaced bins from 16 to 16384 px for the width x height histogram
SAMPLE_MAX_TOXICITY = 0.5  # a caption above this is never shown in the sample grid


def input_columns(stats: dict) -> dict[str, str]:
    """The input's URL, caption and row-id column names, as the run's flags named them."""
    flags = stats.get("flags", {})
    return {"url": flags.get("url_col", "URL"), "caption": flags.get("caption_col", "TEXT"), "id": flags.get("id_col", "SAMPLE_ID")}


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_json(path: str, what: str) -> dict:
    """The JSON object in `path`. FileNotFoundError if it is missing; CardError (one line, naming the
    file) if it is not a JSON object."""
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"{path}: missing ({what}); is this a finished `kiln prepare` output?")
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            raw = f.read()
    except IsADirectoryError:
        raise CardError(f"{path}: a directory, not {what}; {_REWRITE}") from None
    try:
        obj = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CardError(f"{path}: not valid JSON ({err}); it should be {what} as `kiln prepare` writes it: {_REWRITE}") from None
    if not isinstance(obj, dict):
        raise CardError(f"{path}: a JSON {type(obj).__name__}, not the JSON object of {what}; {_REWRITE}")
    return obj


_REWRITE = "re-run the same `kiln prepare` command to rewrite it (kiln prepare --overwrite redoes the dataset)"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What the card reads of stats.json and manifest.json: key -> check, and what it should be.
_STATS_SHAPE = {
    "input": (lambda v: isinstance(v, dict) and _is_int(v.get("rows")) and isinstance(v.get("files", []), list)
              and all(isinstance(f, dict) for f in v.get("files", [])),
              'an object with "rows" (an integer) and "files" (a list of objects)'),
    "kept": (_is_int, "an integer"),
    "rejected": (_is_int, "an integer"),
    "num_shards": (_is_int, "an integer"),
    "accounting": (lambda v: isinstance(v, dict), "an object"),
    "funnel": (lambda v: isinstance(v, list) and all(
        isinstance(f, dict) and isinstance(f.get("stage"), str) and all(_is_int(f.get(k)) for k in ("in", "out", "rejected"))
        and isinstance(f.get("reasons"), dict) for f in v),
        'a list of objects with "stage", "in", "out", "rejected" and "reasons"'),
}
_STATS_OPTIONAL = {  # absent is fine; present, they must have this type
    "flags": (dict,), "stage_modes": (dict,), "models": (dict,), "versions": (dict,), "this_run": (dict,),
    "beam_options": (dict, type(None)), "consent": (dict,),
}
_MANIFEST_ENTRY = {"shard": (str, int), "samples": (int,), "rejected": (int,), "bytes": (int,), "meta": (str,),
                   "tar": (str,), "rejects": (str,)}


def check_shape(stats: dict, manifest: dict, stats_path: str, manifest_path: str) -> None:
    """CardError (one line, naming the file and the key) if stats.json or manifest.json lacks what
    the card reads, or holds it with the wrong type: a hand-edited or foreign file, not kiln's."""
    for key, (ok, want) in _STATS_SHAPE.items():
        if key not in stats:
            raise CardError(f"{stats_path}: no {key!r} key; {_REWRITE}")
        if not ok(stats[key]):
            raise CardError(f"{stats_path}: {key!r} should be {want}, is {_short(stats[key])}; {_REWRITE}")
    for key, types in _STATS_OPTIONAL.items():
        if key in stats and not isinstance(stats[key], types):
            raise CardError(f"{stats_path}: {key!r} should be {' or '.join(t.__name__ for t in types)}, is {_short(stats[key])}; {_REWRITE}")
    if isinstance(stats.get("models"), dict) and not all(isinstance(v, dict) for v in stats["models"].values()):
        raise CardError(f"{stats_path}: 'models' should map each model to an object; {_REWRITE}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise CardError(f"{manifest_path}: 'shards' should be a list, is {_short(shards)}; {_REWRITE}")
    for key in ("num_shards", "samples"):
        if key in manifest and not _is_int(manifest[key]):
            raise CardError(f"{manifest_path}: {key!r} should be an integer, is {_short(manifest[key])}; {_REWRITE}")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise CardError(f"{manifest_path}: shards[{i}] should be an object, is {_short(entry)}; {_REWRITE}")
        for key, types in _MANIFEST_ENTRY.items():
            value = entry.get(key)
            if not isinstance(value, types) or isinstance(value, bool) or (key == "shard" and not str(value).isdigit()):
                raise CardError(f"{manifest_path}: shards[{i}].{key} should be {' or '.join(t.__name__ for t in types)}"
                                f"{' of digits' if key == 'shard' else ''}, is {_short(value)}; {_REWRITE}")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def pct(k: int | float, n: int | float) -> str:
    """k as a share of n, as the card prints it ("-" when n is 0)."""
    return f"{100.0 * k / n:.2f}%" if n else "-"


def domain_of(url) -> str:
    try:
        host = urlsplit(url or "").hostname or ""
    except ValueError:
        host = ""
    host = host.lower()
    if host.startswith("www."):
        host = host[4:]
    return host or "(no host)"


def host_of(url) -> str:
    """The host the training summary counts bytes under: the URL's host name as urllib.parse reads it
    (lowercased, IPv6 in brackets), with its port unless that is 80 or 443 -- no `www.` folding, so
    the names are the hosts the bytes came from. NO_HOST for a URL without one."""
    try:
        parts = urlsplit(url or "")
        host, port = parts.hostname or "", parts.port
    except (ValueError, TypeError):  # a malformed port or netloc
        return NO_HOST
    if not host:
        return NO_HOST
    if ":" in host:
        host = f"[{host}]"
    return host if port in (None, 80, 443) else f"{host}:{port}"


def wh_edges():
    return np.geomspace(16, 16384, WH_BINS + 1)


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


# -- reading the dataset ---------------------------------------------------------------------------


@dataclass
class Facts:
    """Everything the card says, read from the dataset's files (and stats.json)."""

    dataset_dir: str
    stats: dict
    manifest: dict
    columns: dict = field(default_factory=dict)  # input_columns(stats): "url", "caption", "id" -> column name
    shards: list[dict] = field(default_factory=list)  # manifest.json's shard entries
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
    # Downloaded bytes (meta's source_bytes) per host_of(URL column) of the kept rows: the training
    # summary's top domains. Meta files written before source_bytes existed lack the column.
    source_bytes_by_host: collections.Counter = field(default_factory=collections.Counter)
    source_bytes_rows: int = 0  # kept rows with a source_bytes value
    source_bytes_missing: int = 0  # kept rows without one (column absent or null)
    # Rows a --blocklist removed, per (list name, reason), from the rejects' detail ("NAME: ...");
    # only read when stats.json's consent lists blocklists.
    blocklist_rows: collections.Counter = field(default_factory=collections.Counter)
    # The Arrow schemas of the first shard's meta and rejects files (every shard of a run has the
    # same): croissant.json's fields. None without shards.
    meta_schema: object = None
    rejects_schema: object = None


def collect(dataset_dir: str, *, seed: int = 0, n_samples: int = 16, max_sample_punsafe: float = 0.1,
            verify_tars: bool | None = None, unscreened_samples: bool = False) -> Facts:
    """Recount the dataset from its files, check the count against manifest.json and stats.json,
    then read every shard's meta and rejects columns once.

    Raises FileNotFoundError without stats.json or manifest.json, CardError if either is not what
    `kiln prepare` writes (not JSON, the wrong shape, a key missing), and AccountingError (from
    pipeline.accounting.check, naming every disagreement) when the files disagree with them."""
    dataset_dir = dataset_dir.rstrip("/")
    stats_path, manifest_path = join(dataset_dir, "stats.json"), join(dataset_dir, "manifest.json")
    stats = read_json(stats_path, "the run's stats")
    manifest = read_json(manifest_path, "the shard manifest")
    check_shape(stats, manifest, stats_path, manifest_path)
    if verify_tars is None:
        verify_tars = "://" not in dataset_dir  # listing remote tars member by member is slow
    found = Ledger.from_files(dataset_dir, list_tars=verify_tars)
    check(found, Ledger.from_manifest(manifest, stats.get("input", {}).get("rows")), stats=stats)

    facts = Facts(dataset_dir, stats, manifest, columns=input_columns(stats), shards=manifest.get("shards", []),
                  kept=found.kept, rejected=found.rejected, input_rows=found.kept + found.rejected,
                  reasons=found.reasons, funnel=found.funnel(stats.get("stage_modes")),
                  bytes_by_kind=found.bytes_by_kind(), max_sample_punsafe=max_sample_punsafe,
                  unscreened_samples=unscreened_samples)
    for score in SCORES:
        facts.scores[score.column] = FloatHist(score.lo, score.hi, score.bins, ("kept", "rejected_here", "rejected_elsewhere"))
    facts.wh = np.zeros((WH_BINS, WH_BINS), np.int64)
    heap: list = []  # _Neg((rank, uid, shard tar, caption, punsafe)): the n_samples smallest ranks
    url_col, caption_col = facts.columns["url"], facts.columns["caption"]
    meta_columns = (url_col, caption_col, *OPTIONAL_INPUT_COLUMNS, *KILN_META_COLUMNS)
    list_names = blocklist_names(stats)
    reject_columns = REJECT_COLUMNS + (("detail",) if list_names else ())
    for i, s in enumerate(facts.shards):
        if i == 0:
            facts.meta_schema = read_schema(join(dataset_dir, s["meta"]))
            facts.rejects_schema = read_schema(join(dataset_dir, s["rejects"]))
        table = read_columns(join(dataset_dir, s["meta"]), meta_columns)
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        _add_kept(facts, cols, url_col, caption_col)
        _add_sample_candidates(heap, cols, caption_col, s["tar"], seed, n_samples, max_sample_punsafe)
        rejects = read_columns(join(dataset_dir, s["rejects"]), reject_columns)
        _add_rejected(facts, rejects)
        if list_names:
            _add_blocklist_rows(facts, rejects, list_names)

    facts.samples = sorted((n.entry for n in heap), key=lambda e: e[0])
    if not facts.samples_screened and not unscreened_samples:
        facts.samples = []  # no NSFW scores: a public card shows no unscreened web images by default
    return facts


def _add_kept(facts: Facts, cols: dict[str, list], url_col: str, caption_col: str) -> None:
    """One meta file's columns into the counters and histograms of the kept samples."""
    if "LICENSE" in cols:
        facts.has_license_column = True
        facts.licences.update(v if v is not None else "(null)" for v in cols["LICENSE"])
    if "LANGUAGE" in cols:
        facts.languages.update(v if v else "(none)" for v in cols["LANGUAGE"])
    urls = cols.get(url_col, [])
    facts.domains.update(domain_of(u) for u in urls)
    if "source_bytes" in cols:
        for url, n in zip(urls, cols["source_bytes"]):
            if n is None:
                facts.source_bytes_missing += 1
            else:
                facts.source_bytes_by_host[host_of(url)] += n
                facts.source_bytes_rows += 1
    else:
        facts.source_bytes_missing += len(cols.get("uid", urls))
    facts.formats.update(v or "(unknown)" for v in cols.get("source_format", []))
    facts.image_bytes += sum(v or 0 for v in cols.get("image_bytes", []))
    facts.t5_truncated += sum(1 for v in cols.get("t5_truncated", []) if v)
    for score in SCORES:
        if score.column in cols:
            facts.scores[score.column].add("kept", cols[score.column])
            facts.score_non_null[score.column] += sum(v is not None for v in cols[score.column])
    facts.samples_screened = facts.samples_screened or any(p is not None for p in cols.get("punsafe", []))
    ws, hs = cols.get("original_width", []), cols.get("original_height", [])
    facts.shorter_side.add(min(w, h) for w, h in zip(ws, hs) if w is not None and h is not None)
    pairs = np.asarray([(w, h) for w, h in zip(ws, hs) if w and h], dtype=np.float64).reshape(-1, 2)
    if pairs.size:
        edges = wh_edges()
        facts.wh += np.histogram2d(np.clip(pairs[:, 0], 16, 16383), np.clip(pairs[:, 1], 16, 16383), bins=[edges, edges])[0].astype(np.int64)
    facts.stored_side.add(min(w, h) for w, h in zip(cols.get("stored_width", []), cols.get("stored_height", [])) if w is not None and h is not None)
    facts.caption_chars.add(len(t) for t in cols.get(caption_col, []) if t is not None)
    facts.t5_len.add(cols.get("t5_len", []))


def _add_rejected(facts: Facts, table) -> None:
    """One rejects file's scores: each score column split into rows its own stage rejected and
    rows rejected elsewhere (which still carry the score they had)."""
    rcols = {c: table.column(c).to_pylist() for c in table.column_names}
    for score in SCORES:
        if score.column not in rcols:
            continue
        here = [v for st, v in zip(rcols["stage"], rcols[score.column]) if st == score.stage and v is not None]
        elsewhere = [v for st, v in zip(rcols["stage"], rcols[score.column]) if st != score.stage and v is not None]
        facts.scores[score.column].add("rejected_here", here)
        facts.scores[score.column].add("rejected_elsewhere", elsewhere)
        facts.score_non_null[score.column] += len(here) + len(elsewhere)


def blocklist_names(stats: dict) -> list[str]:
    """The --blocklist names stats.json's consent record lists, longest first (a reject's detail
    starts with the name of the list that matched)."""
    consent = stats.get("consent")
    lists = consent.get("blocklists") if isinstance(consent, dict) else None
    if not isinstance(lists, list):
        return []
    names = {str(b.get("name")) for b in lists if isinstance(b, dict) and b.get("name") is not None}
    return sorted(names, key=lambda n: (-len(n), n))


def _add_blocklist_rows(facts: Facts, table, names: list[str]) -> None:
    """Rows each --blocklist removed, per (list name, reason): the detail of a blocklist_* reject
    starts with "NAME: " (pipeline.blocklist). A detail naming no known list counts under None."""
    if "detail" not in table.column_names:
        return
    for reason, detail in zip(table.column("reason").to_pylist(), table.column("detail").to_pylist()):
        if not str(reason).startswith(BLOCKLIST_REASON_PREFIX):
            continue
        detail = detail or ""
        name = next((n for n in names if detail.startswith(f"{n}: ")), None)
        facts.blocklist_rows[(name, reason)] += 1


def read_schema(path: str):
    """The Arrow schema of the parquet file at `path` (its footer only)."""
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return pq.ParquetFile(f).schema_arrow


def _add_sample_candidates(heap: list, cols: dict[str, list], caption_col: str, tar: str, seed: int, n_samples: int,
                           max_sample_punsafe: float) -> None:
    """Keep the n_samples kept samples of smallest seeded rank sha256(f"{seed}:{uid}") in `heap`.

    Only samples the NSFW head scored low (and whose captions scored non-toxic) are eligible: a
    public card shows them. With --nsfw off nothing is scored, and the card says the grid is unscreened."""
    uids = cols.get("uid", [])
    none = [None] * len(uids)
    for uid, text, p, t in zip(uids, cols.get(caption_col, none), cols.get("punsafe", none), cols.get("toxicity", none)):
        if p is not None and p > max_sample_punsafe:
            continue
        if t is not None and t > SAMPLE_MAX_TOXICITY:
            continue
        entry = (sample_rank(seed, uid), uid, tar, text or "", p)
        if len(heap) < n_samples:
            heapq.heappush(heap, _Neg(entry))
        elif heap and entry[0] < heap[0].entry[0]:
            heapq.heapreplace(heap, _Neg(entry))


def sample_rank(seed: int, uid: str) -> str:
    return hashlib.sha256(f"{seed}:{uid}".encode()).hexdigest()


class _Neg:
    """Heap entry ordered so the heap's top is the largest rank (we keep the smallest ranks)."""

    __slots__ = ("entry",)

    def __init__(self, entry):
        self.entry = entry

    def __lt__(self, other):
        return self.entry[0] > other.entry[0]
