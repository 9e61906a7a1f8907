"""The accounting: every input row ends in exactly one place, a shard or the rejects table.

One ledger of what each shard holds, filled from what the run says or from what a reader finds,
and one check that compares the two:

  Ledger.from_footers(input_rows, footers)   the writer's word: each meta parquet's `kiln.shard` footer
  Ledger.from_manifest(manifest, input_rows) manifest.json's word (the dataset card's view)
  Ledger.from_files(dataset_dir)             what the files hold: meta rows, rejects rows grouped by
                                             stage and reason, file sizes (and tar members, if asked)
  check(found, claimed, ...)                 every check the finalizer and the card make; raises
                                             AccountingError naming each problem
  ledger.funnel(modes)                       per stage, in pipeline.records.STAGES order: in, out,
                                             rejected and the rejects by reason

The writer asserts its own shard (candidates == kept + later rejects) while the job runs
(pipeline/write.py); this module checks the whole dataset afterwards, from the files.
"""

from __future__ import annotations

import collections
import re
import tarfile
from dataclasses import dataclass, field

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import RunFailed
from pipeline.outdir import list_files
from pipeline.records import STAGES
from pipeline.write import shard_name

SHARD_FILE = re.compile(r"(\d{6})\.(tar|parquet)")
# The three files of a shard (SHARDS.md): kind -> (folder, extension).
KINDS = {"meta": ("meta", "parquet"), "rejects": ("rejects", "parquet"), "tar": ("shards", "tar")}


class AccountingError(RunFailed):
    """input rows != kept + rejected, or the files disagree with what the run says: the run has failed.

    `result` is check()'s full record (every check, passed or not); `problems` lists what failed."""

    def __init__(self, message: str, result: dict, problems: list[str]):
        super().__init__(message)
        self.result = result
        self.problems = problems


def shard_path(kind: str, shard: int) -> str:
    """A shard's file of `kind` ("meta", "rejects", "tar"), relative to the dataset directory."""
    folder, ext = KINDS[kind]
    return f"{folder}/{shard_name(shard)}.{ext}"


@dataclass
class ShardEntry:
    """One shard's numbers. None: the source does not say (or, read from files, the file is absent)."""

    samples: int | None = None  # kept rows: meta parquet rows
    rejected: int | None = None  # rejects parquet rows
    reasons: dict[str, dict[str, int]] | None = None  # stage -> reason -> rejects rows
    candidates: int | None = None  # rows routed to the shard after the prefilter (footers only)
    tar_bytes: int | None = None
    rejects_bytes: int | None = None
    meta_bytes: int | None = None
    tar_keys: tuple[int, int, int] | None = None  # files, listed: (samples in the tar, only in the tar, only in the meta)

    def has(self, kind: str) -> bool:
        """Whether the file is on disk (read from files: its size is known even if it is unreadable)."""
        return {"meta": self.meta_bytes, "rejects": self.rejects_bytes, "tar": self.tar_bytes}[kind] is not None

    @property
    def later_rejects(self) -> int:
        """Rejects after the prefilter: a candidate routed to the shard ends as a sample or one of these."""
        return sum(n for stage, by_reason in (self.reasons or {}).items() if stage != STAGES[0] for n in by_reason.values())


@dataclass
class Ledger:
    """What each shard holds, by shard number, as one source states it."""

    source: str  # who says so, as the check's messages name it: "the footers", "manifest.json", "the files"
    says: str  # the same about one shard: "its footer says", "manifest.json says"
    shards: dict[int, ShardEntry]
    input_rows: int | None = None  # rows in the input (None: the files alone cannot say)
    num_shards: frozenset[int] = frozenset()  # every shard count the source states
    fingerprints: frozenset[str] = frozenset()  # configuration fingerprints (footers)
    stated_samples: int | None = None  # a total the source states besides its shards (manifest.json's "samples")
    unreadable: list[str] = field(default_factory=list)  # files that could not be read, with why

    @property
    def kept(self) -> int:
        return sum(s.samples or 0 for s in self.shards.values())

    @property
    def rejected(self) -> int:
        return sum(s.rejected or 0 for s in self.shards.values())

    @property
    def reasons(self) -> dict[str, dict[str, int]]:
        """stage -> reason -> rows over every shard: STAGES order (then unknown stages), reasons sorted."""
        total: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for s in self.shards.values():
            for stage, by_reason in (s.reasons or {}).items():
                total[stage].update(by_reason)
        order = [st for st in STAGES if st in total] + sorted(set(total) - set(STAGES))
        return {st: dict(sorted(total[st].items())) for st in order}

    def bytes_by_kind(self) -> dict[str, int]:
        """Bytes of every meta, rejects and tar file (as read from files)."""
        return {
            "meta": sum(s.meta_bytes or 0 for s in self.shards.values()),
            "rejects": sum(s.rejects_bytes or 0 for s in self.shards.values()),
            "shards": sum(s.tar_bytes or 0 for s in self.shards.values()),
        }

    def funnel(self, modes: dict | None = None, input_rows: int | None = None) -> list[dict]:
        """Per stage in STAGES order: mode, in, out, rejected, reasons. Rows enter the first stage
        as `input_rows` (default: the ledger's input rows, else kept + rejected). Stages that were
        off (`modes`: stage -> filter | score | off), or are missing from `modes`, and rejected
        nothing are left out."""
        reasons = self.reasons
        current = input_rows if input_rows is not None else self.input_rows
        if current is None:
            current = self.kept + self.rejected
        funnel = []
        for stage in STAGES:
            by_reason = reasons.get(stage, {})
            rejected = sum(by_reason.values())
            if modes is not None and stage not in modes and not rejected:
                continue  # a stage the run did not know of (stats.json of an older kiln) and that removed nothing
            mode = (modes or {}).get(stage, "filter")
            if mode == "off" and not rejected:
                continue
            funnel.append({"stage": stage, "mode": mode, "in": current, "out": current - rejected, "rejected": rejected,
                           "reasons": dict(by_reason)})
            current -= rejected
        return funnel

    # -- the three sources -----------------------------------------------------------------------

    @classmethod
    def from_footers(cls, input_rows: int, footers: dict[int, dict]) -> Ledger:
        """The writer's word: `footers` maps shard number -> its meta parquet's `kiln.shard` footer
        (pipeline.finalize.read_footers); `input_rows` is counted from the input files."""
        shards = {
            int(i): ShardEntry(samples=f["samples"], rejected=f["rejects"], reasons=f["rejects_by_reason"],
                               candidates=f["candidates"], tar_bytes=f["tar"]["bytes"], rejects_bytes=f["rejects_file"]["bytes"])
            for i, f in footers.items()
        }
        return cls("the footers", "its footer says", shards, input_rows,
                   num_shards=frozenset(f["num_shards"] for f in footers.values()),
                   fingerprints=frozenset(f["config_fingerprint"] for f in footers.values()))

    @classmethod
    def from_manifest(cls, manifest: dict, input_rows: int | None) -> Ledger:
        """manifest.json's word; `input_rows` as stats.json states it."""
        listed = manifest.get("shards", [])
        shards = {int(s["shard"]): ShardEntry(samples=s["samples"], rejected=s["rejected"], tar_bytes=s["bytes"]) for s in listed}
        stated = {len(listed)} | ({manifest["num_shards"]} if "num_shards" in manifest else set())
        return cls("manifest.json", "manifest.json says", shards, input_rows, num_shards=frozenset(stated), stated_samples=manifest.get("samples"))

    @classmethod
    def from_files(cls, dataset_dir: str, *, list_tars: bool = False) -> Ledger:
        """What a reader finds in dataset_dir: every NNNNNN file of meta/, rejects/ and shards/ --
        meta rows (from the parquet footers), rejects rows grouped by stage and reason, sizes.
        `list_tars`: also compare each tar's member keys with its meta file's uids (reads every tar header)."""
        base = dataset_dir.rstrip("/")
        shards: dict[int, ShardEntry] = collections.defaultdict(ShardEntry)
        unreadable = []
        for kind, (folder, ext) in KINDS.items():
            for m in list_files(f"{base}/{folder}"):  # never a glob: the directory's name may hold [ ] * ?
                name = m.path.rsplit("/", 1)[-1]
                if not SHARD_FILE.fullmatch(name) or not name.endswith(f".{ext}"):
                    continue
                entry = shards[int(name[:6])]
                try:
                    if kind == "meta":
                        entry.meta_bytes = m.size_in_bytes
                        with FileSystems.open(m.path) as f:
                            entry.samples = pq.ParquetFile(f).metadata.num_rows
                    elif kind == "rejects":
                        entry.rejects_bytes = m.size_in_bytes
                        table = read_columns(m.path, ("stage", "reason"))
                        counts = collections.Counter(zip(*(table.column(c).to_pylist() if c in table.column_names
                                                           else [None] * table.num_rows for c in ("stage", "reason"))))
                        entry.reasons = {}
                        for (stage, reason), n in sorted(counts.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
                            entry.reasons.setdefault(stage, {})[reason] = n
                        entry.rejected = table.num_rows
                    else:
                        entry.tar_bytes = m.size_in_bytes
                except Exception as err:  # noqa: BLE001 - a damaged file is a finding, not a crash
                    unreadable.append(f"{folder}/{name}: unreadable ({type(err).__name__}: {err})")
        if list_tars:
            for i, entry in sorted(shards.items()):
                if entry.samples is None or entry.tar_bytes is None:
                    continue
                try:
                    uids = set(read_columns(f"{base}/{shard_path('meta', i)}", ("uid",)).column("uid").to_pylist())
                    with FileSystems.open(f"{base}/{shard_path('tar', i)}") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                        keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
                except Exception as err:  # noqa: BLE001
                    unreadable.append(f"{shard_path('tar', i)}: could not list its members against the meta uids ({type(err).__name__}: {err})")
                    continue
                entry.tar_keys = (len(keys), len(keys - uids), len(uids - keys))
        return cls("the files", "the files say", dict(sorted(shards.items())), unreadable=unreadable)


def read_columns(path: str, wanted):
    """The columns of `wanted` that the parquet file at `path` has (older outputs lack some)."""
    with FileSystems.open(path) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        return pf.read(columns=[c for c in wanted if c in names])


# -- the check -----------------------------------------------------------------------------------


def check(found: Ledger, claimed: Ledger, *, counters: dict | None = None, stats: dict | None = None) -> dict:
    """Compare what the files hold (`found`, Ledger.from_files) with what the run says (`claimed`:
    its footers, or manifest.json), plus the job's Beam `counters` (finalizer) or stats.json (card).

    Returns {"ok", "input_rows", "kept", "rejected", "checks": [{"name", "ok", "detail"}]}: the
    record stats.json keeps. Raises AccountingError, carrying that record, if any check fails."""
    checks: list[dict] = []
    failed: list[str] = []  # "check name: problem", one per problem

    def record(name: str, problems: list[str], ok_detail: str) -> None:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        checks.append({"name": name, "ok": not problems, "detail": "; ".join(problems[:10]) + more if problems else ok_detail})
        failed.extend(f"{name}: {p}" for p in problems)

    src = claimed.source
    counts = sorted(claimed.num_shards)
    record("one shard count", [] if len(counts) == 1 else
           [f"different shard counts in {src}: {counts}" if counts else f"no shard in {src}"], f"{counts[0] if counts else 0} shards")
    record("all shards complete", _completeness(found, claimed), "every shard has its meta, rejects and tar file")
    if claimed.fingerprints:  # footers name the configuration that wrote each shard
        record("one configuration", [] if len(claimed.fingerprints) == 1 else
               [f"{len(claimed.fingerprints)} configuration fingerprints in {src}: {sorted(claimed.fingerprints)}"],
               "one configuration fingerprint")
    record(f"shard files match {src}", found.unreadable + _mismatches(found, claimed), "every file as stated")
    if any(s.candidates is not None for s in claimed.shards.values()):  # footers: the writer's own count
        record("per-shard candidates == kept + later rejects", [
            f"shard {shard_name(i)}: {s.candidates} candidates != {s.samples} kept + {s.later_rejects} later rejects"
            for i, s in sorted(claimed.shards.items()) if s.candidates is not None and s.samples + s.later_rejects != s.candidates
        ], "every shard's candidates came back as samples or rejects")
    kept, rejected = found.kept, found.rejected
    if claimed.input_rows is not None:
        detail = f"{claimed.input_rows} input rows, {kept} kept + {rejected} rejected = {kept + rejected}"
        record("input rows == kept + rejected", [] if claimed.input_rows == kept + rejected else [detail], detail)
    unknown = sorted(set(found.reasons) - set(STAGES), key=str)
    record("every reject has a known stage", [f"rejects parquet: unknown stages {unknown}"] if unknown else [], "stages are pipeline.records.STAGES")
    if counters:
        _check_counters(counters, claimed.input_rows, record)
    if stats is not None:
        record("stats.json matches the files", _stats_mismatches(stats, found, claimed), "kept, rejected, shards and funnel agree")

    result = {"ok": not failed, "input_rows": claimed.input_rows, "kept": kept, "rejected": rejected, "checks": checks}
    if failed:
        raise AccountingError("accounting failed:\n  " + "\n  ".join(failed), result, failed)
    return result


def _completeness(found: Ledger, claimed: Ledger) -> list[str]:
    """Shards the source's shard count calls for but it lacks, files it lists that are not on disk,
    and shard files on disk that it does not list."""
    src = claimed.source
    out = []
    if len(claimed.num_shards) == 1:
        (n,) = claimed.num_shards
        out += [f"shard {shard_name(i)}: missing from {src}" for i in range(n) if i not in claimed.shards]
        out += [f"shard {shard_name(i)}: listed in {src}, but num_shards is {n}" for i in sorted(claimed.shards) if i >= n]
    for kind in KINDS:
        out += [f"{shard_path(kind, i)}: listed in {src} but missing on disk"
                for i in sorted(claimed.shards) if not found.shards.get(i, ShardEntry()).has(kind)]
        out += [f"{shard_path(kind, i)}: on disk but not in {src}"
                for i, s in sorted(found.shards.items()) if s.has(kind) and i not in claimed.shards]
    return out


def _mismatches(found: Ledger, claimed: Ledger) -> list[str]:
    """Per shard listed by both: each number the source states against the file's."""
    src, says = claimed.source, claimed.says
    out = []
    for i, c in sorted(claimed.shards.items()):
        f = found.shards.get(i)
        if f is None:
            continue
        if c.tar_bytes is not None and f.tar_bytes is not None and f.tar_bytes != c.tar_bytes:
            out.append(f"{shard_path('tar', i)}: {f.tar_bytes} bytes on disk, {says} {c.tar_bytes}")
        if f.tar_keys is not None and f.tar_keys[1:] != (0, 0):
            n_tar, only_tar, only_meta = f.tar_keys
            out.append(f"{shard_path('tar', i)}: holds {n_tar} samples, meta parquet lists {f.samples} "
                       f"({only_tar} only in the tar, {only_meta} only in the meta)")
        if c.samples is not None and f.samples is not None and f.samples != c.samples:
            out.append(f"{shard_path('meta', i)}: {f.samples} rows, {says} {c.samples} samples")
        if c.rejects_bytes is not None and f.rejects_bytes is not None and f.rejects_bytes != c.rejects_bytes:
            out.append(f"{shard_path('rejects', i)}: {f.rejects_bytes} bytes on disk, {says} {c.rejects_bytes}")
        if c.rejected is not None and f.rejected is not None and f.rejected != c.rejected:
            out.append(f"{shard_path('rejects', i)}: {f.rejected} rows, {says} {c.rejected} rejected")
        elif c.reasons is not None and f.reasons is not None and _sorted_reasons(f.reasons) != _sorted_reasons(c.reasons):
            out.append(f"{shard_path('rejects', i)}: rows by stage and reason {_sorted_reasons(f.reasons)}, "
                       f"{says} {_sorted_reasons(c.reasons)}")
    if claimed.stated_samples is not None and claimed.stated_samples != found.kept:
        out.append(f"{src}: samples {claimed.stated_samples}, meta parquet files hold {found.kept} rows")
    return out


def _sorted_reasons(reasons: dict) -> dict:
    return {st: dict(sorted(r.items())) for st, r in sorted(reasons.items(), key=lambda kv: str(kv[0])) if r}


def _check_counters(counters: dict, input_rows: int | None, record) -> None:
    """The job's own Beam counters (this run's; a resumed run passes only read/rows)."""
    read = counters.get("read/rows")
    if read is not None and input_rows is not None:
        detail = f"job read {read}, footers hold {input_rows}"
        record("rows read by the job == rows in the input footers", [] if read == input_rows else [detail], detail)
    for stage in STAGES:
        c_in, c_out, c_rej = (counters.get(f"{stage}/{k}") for k in ("in", "out", "rejected"))
        if c_in is None:
            continue
        c_out, c_rej = c_out or 0, c_rej or 0
        detail = f"in {c_in}, out {c_out}, rejected {c_rej}"
        record(f"{stage}: in == out + rejected (this run's counters)", [] if c_in == c_out + c_rej else [f"{stage}: {detail}"], detail)
    ran = [s for s in STAGES if counters.get(f"{s}/in") is not None]
    for a, b in zip(ran, ran[1:]):
        a_out, b_in = counters.get(f"{a}/out", 0), counters[f"{b}/in"]
        detail = f"{a_out} vs {b_in}"
        record(f"{a} out == {b} in (this run's counters)", [] if a_out == b_in else [f"{a} out {a_out}, {b} in {b_in}"], detail)
    if ran and counters.get("write/samples") is not None:
        last_out, written = counters.get(f"{ran[-1]}/out", 0), counters["write/samples"]
        detail = f"{last_out} vs {written}"
        record(f"{ran[-1]} out == samples written", [] if last_out == written else [f"{ran[-1]} out {last_out}, {written} samples written"], detail)


def _stats_mismatches(stats: dict, found: Ledger, claimed: Ledger) -> list[str]:
    """stats.json against the files (the card's check): totals, shard count, the run's own verdict, the funnel."""
    out = []
    if not isinstance(stats.get("input", {}).get("rows"), int):
        out.append(f"stats.json: no input row count (input.rows is {stats.get('input', {}).get('rows')!r})")
    if stats.get("kept") != found.kept:
        out.append(f"stats.json: kept {stats.get('kept')}, meta parquet files hold {found.kept} rows")
    if stats.get("rejected") != found.rejected:
        out.append(f"stats.json: rejected {stats.get('rejected')}, rejects parquet files hold {found.rejected} rows")
    if stats.get("num_shards") != len(claimed.shards):
        out.append(f"stats.json: num_shards {stats.get('num_shards')}, {claimed.source} lists {len(claimed.shards)}")
    if not (stats.get("accounting") or {}).get("ok"):
        out.append("stats.json: the run's own accounting did not pass (accounting.ok is not true)")
    got = {f["stage"]: (f["in"], f["out"], f["rejected"], f["reasons"]) for f in found.funnel(stats.get("stage_modes"), claimed.input_rows)}
    want = {f["stage"]: (f["in"], f["out"], f["rejected"], dict(sorted(f["reasons"].items()))) for f in stats.get("funnel", [])}
    if list(got) != list(want) or got != want:
        diffs = [f"{st}: stats.json {want.get(st)} vs rejects files {got.get(st)}" for st in STAGES if want.get(st) != got.get(st)]
        out.append("funnel differs from the rejects files (stage: (in, out, rejected, reasons)): " + "; ".join(diffs))
    return out
