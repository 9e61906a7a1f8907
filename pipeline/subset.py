"""`kiln subset PARENT --out CHILD [rules]`: a finished kiln dataset -> a smaller one, offline.

A Beam job (Beam's FnApiRunner in-process unless --runner names another: `_local_runner`; any
runner `kiln prepare` runs on) that reads a finished dataset (PARENT/_SUCCESS present) and writes a
child in the same shard contract (SHARDS.md), without any network access: nothing here opens a
socket, and no model is loaded (--dedup-semantic compares the stored CLIP image embeddings) except
the parent's CLIP model for --decontaminate-cosine, which embeds the evaluation images only.

This module is the command, the rules and the driver, and imports no Beam at module level (so
`kiln --help` stays instant); the Beam transforms are pipeline.subset_job.

    parent shard ─► ReadMetaRows ─► rules, in this order; the first that fails names the reason:
                      1 --blocklist        blocklist_sample_id / _url_sha256 / _url_md5 / _domain
                                           (the stored id and URL), blocklist_image_sha256 (the stored
                                           image's sha256), blocklist_pdq (the stored PDQ hash)
                      2 --optout-list      optout_list (the stored URL)
                      3 --drop-uids        uid_dropped
                      4 --keep-uids        uid_not_listed
                      5 --licenses         license_not_allowed (the --license-col value)
                      6 --min-stored-size  too_small (min(stored_width, stored_height))
                      7 threshold flags, then --where    where (false or null)
                      8 dedup (pipeline.dedup, over every parent sample that passed 1-7):
                                           duplicate_exact / _pdq / _semantic / eval_overlap
                 ─► WriteSubsetShard: kept tar members copied byte for byte (same member headers,
                    so a subset that keeps everything reproduces the parent's tars), rejects with
                    stage `subset`, meta rows unchanged, footer with the child's fingerprint

The child keeps the parent's num_shards (a shard is a uid range, so it stays valid). Its input rows
are the parent's kept samples; every one ends as a kept sample or a `subset` reject, checked by
pipeline.accounting like `kiln prepare`'s. Then manifest.json, stats.json (its "subset" object: the
parent's path, fingerprint, card sha256 and funnel, the rules, each list's sha256), the card,
croissant.json and the training summary (pipeline.card), and _SUCCESS last.

Re-running resumes: shards whose meta file is there with the child's fingerprint are skipped, and
the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.records import STAGE_SUBSET, Reject, rejects_schema

THRESHOLD_FLAGS = (  # (flag, dest, column, operator): common rules, each the --where condition it stands for
    ("--min-clip-similarity", "min_clip_similarity", "clip_similarity", ">="),
    ("--max-punsafe", "max_punsafe", "punsafe", "<="),
    ("--max-toxicity", "max_toxicity", "toxicity", "<="),
)
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


class SubsetError(UserError):
    """A bad parent, output or rule (one line, exit 2)."""


# -- uid lists ---------------------------------------------------------------------------------------


@dataclass
class UidList:
    """A --keep-uids / --drop-uids file: 128-bit hex uids (kiln's uid, DataComp's) as a sorted (n, 2)
    uint64 array for a binary search, and any other entries (row ids ...) as text."""

    path: str
    sha256: str
    hex128: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))
    other: frozenset = frozenset()

    def __len__(self) -> int:
        return len(self.hex128) + len(self.other)

    def __contains__(self, value) -> bool:
        if value is None:
            return False
        text = str(value).strip()
        if _HEX32.match(text) and len(self.hex128):
            pair = (int(text[:16], 16), int(text[16:], 16))
            i = int(np.searchsorted(self.hex128[:, 0], np.uint64(pair[0]), side="left"))
            while i < len(self.hex128) and int(self.hex128[i, 0]) == pair[0]:
                if int(self.hex128[i, 1]) == pair[1]:
                    return True
                i += 1
            return False
        return text in self.other or text.lower() in self.other


def _pairs_sorted(pairs: np.ndarray) -> np.ndarray:
    pairs = np.asarray(pairs, dtype=np.uint64).reshape(-1, 2)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return np.ascontiguousarray(pairs[order])


def load_uid_list(path: str, flag: str) -> UidList:
    """A uid list: DataComp's .npy (a sorted structured array of dtype "u8,u8": the uid's high and low
    64 bits; also an (n, 2) uint64 array, or an array of 32-hex strings), or plain text (one entry per
    line; '#' comments and blank lines ignored). SubsetError, one line, if it cannot be read."""
    data = _read_bytes(path, flag)
    sha = hashlib.sha256(data).hexdigest()
    if data[:6] == b"\x93NUMPY":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:
            raise SubsetError(f"{flag} {path}: a .npy kiln cannot read without pickle ({err}); save the uids as a "
                              f'numpy array of dtype "u8,u8" (DataComp\'s format) or as text, one per line') from None
        if arr.dtype.names and len(arr.dtype.names) == 2:
            pairs = np.stack([arr[arr.dtype.names[0]], arr[arr.dtype.names[1]]], axis=1)
            return UidList(path, sha, hex128=_pairs_sorted(pairs))
        if arr.ndim == 2 and arr.shape[1] == 2 and np.issubdtype(arr.dtype, np.integer):
            return UidList(path, sha, hex128=_pairs_sorted(arr))
        if arr.dtype.kind in ("U", "S"):
            return _from_text(path, sha, (v.decode() if isinstance(v, bytes) else str(v) for v in arr.ravel()), flag)
        raise SubsetError(f"{flag} {path}: a .npy of dtype {arr.dtype} and shape {arr.shape}; kiln reads DataComp's "
                          f'dtype "u8,u8" pairs, an (n, 2) uint64 array or 32-hex strings')
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SubsetError(f"{flag} {path}: neither a .npy file nor UTF-8 text (one uid per line)") from None
    return _from_text(path, sha, text.splitlines(), flag)


def _from_text(path: str, sha: str, lines, flag: str) -> UidList:
    pairs, other = [], set()
    for line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if _HEX32.match(s):
            pairs.append((int(s[:16], 16), int(s[16:], 16)))
        else:
            other.add(s)
    return UidList(path, sha, hex128=_pairs_sorted(np.array(pairs, dtype=np.uint64).reshape(-1, 2)), other=frozenset(other))


def _read_bytes(path: str, flag: str) -> bytes:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read()
    except (OSError, ValueError) as err:
        raise SubsetError(f"{flag} {path}: cannot read it ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None


# -- the parent --------------------------------------------------------------------------------------


@dataclass
class Parent:
    """What the job needs of the parent dataset, read once in the driver."""

    path: str
    stats: dict
    manifest: dict
    manifest_sha256: str
    footers: dict  # shard -> its meta footer (pipeline.finalize.read_footers)
    num_shards: int
    meta_schema: pa.Schema  # without the footer metadata
    card_sha256: str | None

    @property
    def fingerprint(self) -> str:
        return self.stats.get("config_fingerprint")

    @property
    def flags(self) -> dict:
        return self.stats.get("flags") or {}

    @property
    def kept(self) -> int:
        return sum(f["samples"] for f in self.footers.values())


def read_parent(path: str) -> Parent:
    """A finished kiln dataset at `path`, or SubsetError in one line (no _SUCCESS, not kiln's, incomplete)."""
    from apache_beam.io.filesystems import FileSystems

    from pipeline.finalize import read_footers

    base = path.rstrip("/")
    if not FileSystems.exists(f"{base}/_SUCCESS"):
        what = "does not exist" if not FileSystems.exists(base) and not os.path.isdir(base) else "has no _SUCCESS"
        raise SubsetError(f"parent {path} {what}: kiln subset reads a finished kiln dataset (the output of `kiln prepare` "
                          f"or `kiln subset`, with _SUCCESS); finish it by re-running the command that made it")
    stats, raw_manifest = _read_json(f"{base}/stats.json"), _read_raw(f"{base}/manifest.json")
    try:
        manifest = json.loads(raw_manifest)
    except ValueError:
        manifest = None
    if not isinstance(stats, dict) or not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise SubsetError(f"parent {path}: stats.json or manifest.json is not what kiln writes; is it a kiln dataset?")
    footers = read_footers(base)
    listed = {int(s["shard"]) for s in manifest["shards"]}
    n = manifest.get("num_shards", len(listed))
    if set(footers) != listed or listed != set(range(n)):
        raise SubsetError(f"parent {path}: manifest.json lists {len(listed)} shards of {n}, meta/ has footers for "
                          f"{len(footers)}; run `kiln card {path}` to see what is wrong")
    if n == 0:
        raise SubsetError(f"parent {path} has no shards")
    card = f"{base}/README.md"
    card_sha = hashlib.sha256(_read_raw(card)).hexdigest() if FileSystems.exists(card) else None
    with FileSystems.open(f"{base}/{shard_path('meta', 0)}") as f:
        schema = pq.ParquetFile(f).schema_arrow.remove_metadata()
    return Parent(base, stats, manifest, hashlib.sha256(raw_manifest).hexdigest(), footers, n, schema, card_sha)


def shard_path(kind: str, shard: int) -> str:
    from pipeline.accounting import shard_path as sp

    return sp(kind, shard)


def _read_raw(path: str) -> bytes:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def _read_json(path: str):
    try:
        return json.loads(_read_raw(path))
    except (OSError, ValueError):
        return None


# -- the rules ---------------------------------------------------------------------------------------


@dataclass
class Rules:
    """Every rule of a subset, as plain data (picklable: it travels to the workers)."""

    id_col: str = "SAMPLE_ID"
    url_col: str = "URL"
    blocklists: object = None  # pipeline.blocklist.Blocklists or None
    blocklist_files: list = field(default_factory=list)  # [{name, path, sha256, entries, not_applied}]
    optout_lists: list = field(default_factory=list)  # [pipeline.blocklist.OptOutList]
    drop_uids: list = field(default_factory=list)  # [UidList]
    keep_uids: list = field(default_factory=list)
    uid_col: str = "uid"
    licenses: tuple | None = None
    license_col: str = "LICENSE"
    min_stored_size: int | None = None
    thresholds: tuple = ()  # ((flag, column, op, value), ...)
    where: str | None = None
    dedup: object = None  # pipeline.dedup.DedupRules or None
    eval_clip: dict | None = None  # --decontaminate-cosine: the CLIP model the eval images go through (spec, sha256)
    clip_loader: object = None  # its pipeline.dedup.ClipEmbedder (not part of describe(): eval_clip names it)

    def conditions(self) -> list[tuple[str, str]]:
        """(label, expression) of the threshold flags and --where, in order."""
        out = [(f"{flag} {value}", f"{column} {op} {value!r}") for flag, column, op, value in self.thresholds]
        if self.where:
            out.append(("--where", self.where))
        return out

    def describe(self) -> list[dict]:
        """The rules in the order they apply, for stats.json, the fingerprint and the card."""
        out = []
        if self.blocklist_files:
            out.append({"rule": "blocklist", "reasons": "blocklist_*", "lists": self.blocklist_files})
        if self.optout_lists:
            out.append({"rule": "optout_list", "reasons": "optout_list",
                        "lists": [{"path": o.path, "sha256": o.sha256, "domains": len(o.domains), "prefixes": len(o.prefixes)}
                                  for o in self.optout_lists]})
        for name, lists, reason in (("drop_uids", self.drop_uids, "uid_dropped"), ("keep_uids", self.keep_uids, "uid_not_listed")):
            if lists:
                out.append({"rule": name, "reasons": reason, "column": self.uid_col,
                            "lists": [{"path": u.path, "sha256": u.sha256, "entries": len(u)} for u in lists]})
        if self.licenses is not None:
            out.append({"rule": "licenses", "reasons": "license_not_allowed", "column": self.license_col,
                        "allowed": list(self.licenses)})
        if self.min_stored_size is not None:
            out.append({"rule": "min_stored_size", "reasons": "too_small", "px": self.min_stored_size})
        for label, expr in self.conditions():
            out.append({"rule": label.split()[0].lstrip("-").replace("-", "_"), "reasons": "where", "expression": expr})
        if self.dedup is not None:
            out.append({"rule": "dedup", "reasons": "duplicate_* / eval_overlap", **self.dedup.describe(),
                        **({"eval_clip_model": self.eval_clip} if self.eval_clip else {})})
        return out


class RowRules:
    """Rules 1-7 compiled for one worker: `first_failure(row)` -> Reject or None."""

    def __init__(self, rules: Rules, kinds: dict):
        from pipeline.where import compile_where

        self.r = rules
        self.conditions = [(label, compile_where(expr, kinds)) for label, expr in rules.conditions()]
        self.licenses = None if rules.licenses is None else {v.strip().lower() for v in rules.licenses}
        # --blocklist image_sha256 entries against the stored image's sha256 (the meta column).
        self.image_sha256 = {}
        for b in (rules.blocklists.lists if rules.blocklists else ()):
            for v in sorted(b.entries.get("image_sha256", ())):
                self.image_sha256.setdefault(v, b.name)

    def first_failure(self, row: dict) -> Reject | None:
        r = self.r
        bl = r.blocklists
        if bl is not None:
            url = row.get(r.url_col)
            m = bl.match_row(row.get(r.id_col), url if isinstance(url, str) else "") if bl.needs_row else None
            if m is None and self.image_sha256 and row.get("image_sha256") in self.image_sha256:
                name = self.image_sha256[row["image_sha256"]]
                return Reject(STAGE_SUBSET, "blocklist_image_sha256", f"{name}: image_sha256 {row['image_sha256']}")
            if m is None and bl.needs_pdq and row.get("pdq_hash"):
                m = bl.match_pdq(row["pdq_hash"])
            if m is not None:
                return Reject(STAGE_SUBSET, m.reason, m.detail)
        url = row.get(r.url_col)
        for o in r.optout_lists:
            entry = o.match(url) if isinstance(url, str) else None
            if entry is not None:
                return Reject(STAGE_SUBSET, "optout_list", f"{o.path}: {entry}")
        value = row.get(r.uid_col)
        for u in r.drop_uids:
            if value in u:
                return Reject(STAGE_SUBSET, "uid_dropped", f"{r.uid_col} {value} is on --drop-uids {u.path}")
        if r.keep_uids and not any(value in u for u in r.keep_uids):
            return Reject(STAGE_SUBSET, "uid_not_listed", f"{r.uid_col} {value} is on no --keep-uids list")
        if self.licenses is not None:
            lic = row.get(r.license_col)
            if lic is None or str(lic).strip().lower() not in self.licenses:
                return Reject(STAGE_SUBSET, "license_not_allowed", f"{r.license_col} {'null' if lic is None else repr(str(lic)[:100])} "
                                                                   f"is not in --licenses")
        if r.min_stored_size is not None:
            w, h = row.get("stored_width"), row.get("stored_height")
            if w is None or h is None or min(w, h) < r.min_stored_size:
                return Reject(STAGE_SUBSET, "too_small", f"stored {w}x{h} px, --min-stored-size {r.min_stored_size}")
        for label, cond in self.conditions:
            if not cond.keeps(row):
                detail = cond.explain(row)
                return Reject(STAGE_SUBSET, "where", detail if label == "--where" else f"{label}: {detail}")
        return None

    def columns(self) -> set:
        """The meta columns rules 1-7 read."""
        r = self.r
        cols = {r.uid_col, r.id_col, r.url_col, "stored_width", "stored_height", "image_sha256", "pdq_hash", r.license_col}
        for _, cond in self.conditions:
            cols.update(cond.columns)
        return cols


# -- the job -----------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything the workers need, decided in the driver."""

    parent: str
    output: str
    num_shards: int
    parent_footers: dict  # shard -> {"tar": {...}, "samples": n}
    meta_schema: pa.Schema
    rejects_schema: pa.Schema
    fingerprint: str
    rules: Rules
    kinds: dict  # column -> where-kind

    def row_rules(self) -> RowRules:
        """Rules 1-7 compiled for a worker (pipeline.subset_job calls this in DoFn.setup)."""
        return RowRules(self.rules, self.kinds)


# -- the driver --------------------------------------------------------------------------------------


def _fingerprint(parent: Parent, rules: Rules) -> str:
    payload = {"parent_fingerprint": parent.fingerprint, "parent_manifest_sha256": parent.manifest_sha256,
               "rules": rules.describe()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_paths(parent: str, output: str) -> None:
    def norm(p):
        return os.path.realpath(p) if "://" not in p else p.rstrip("/")

    a, b = norm(parent), norm(output)
    if a == b or b.startswith(a.rstrip("/") + "/"):
        raise SubsetError(f"--out {output} is the parent or inside it: kiln never writes into a parent dataset; choose "
                          f"another directory")


def rules_from_args(args, parent: Parent) -> tuple[Rules, list[str]]:
    """(the rules, warnings) from the command's flags, checked against the parent's columns."""
    from pipeline.blocklist import Blocklists, load_blocklist, load_optout_list
    from pipeline.config import ConfigError
    from pipeline.where import column_kinds, compile_where

    flags = parent.flags
    columns = parent.meta_schema.names
    warnings = []
    rules = Rules(id_col=flags.get("id_col", "SAMPLE_ID"), url_col=flags.get("url_col", "URL"), uid_col=args.uid_col,
                  license_col=args.license_col)
    kinds = column_kinds(parent.meta_schema)

    def need(column: str, flag: str):
        if column not in columns:
            raise SubsetError(f"{flag}: the parent has no column {column!r}; its columns: {', '.join(columns)}")

    try:
        lists = [load_blocklist(path) for path in args.blocklist]
        rules.optout_lists = [load_optout_list(path) for path in args.optout_list]
    except ConfigError as err:
        raise SubsetError(str(err)) from None
    if lists:
        rules.blocklists = Blocklists(lists)
        for b in lists:
            md5 = len(b.entries.get("image_md5", ()))
            rules.blocklist_files.append({"name": b.name, "path": b.path, "sha256": b.sha256, "entries": b.counts(),
                                          "pdq_threshold": b.pdq_threshold, "not_applied": {"image_md5": md5} if md5 else {}})
            if md5:
                warnings.append(f"--blocklist {b.path}: {md5} image_md5 entries not applied: kiln stores no md5 of the images "
                                f"(their sha256 and PDQ hash are matched); the card records this")
    rules.drop_uids = [load_uid_list(path, "--drop-uids") for path in args.drop_uids]
    rules.keep_uids = [load_uid_list(path, "--keep-uids") for path in args.keep_uids]
    if rules.drop_uids or rules.keep_uids:
        need(args.uid_col, "--uid-col")
    if args.licenses is not None:
        need(args.license_col, "--license-col")
        rules.licenses = tuple(sorted({v.strip() for v in args.licenses.split(",") if v.strip()}))
        if not rules.licenses:
            raise SubsetError("--licenses: give at least one licence value (comma-separated, as in the licence column)")
    if args.min_stored_size is not None:
        if args.min_stored_size < 1:
            raise SubsetError(f"--min-stored-size {args.min_stored_size}: a size in px, at least 1")
        rules.min_stored_size = args.min_stored_size
    thresholds = []
    for flag, dest, column, op in THRESHOLD_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            need(column, flag)
            thresholds.append((flag, column, op, value))
    rules.thresholds = tuple(thresholds)
    if args.where is not None:
        rules.where = args.where.strip()
    for _, expr in rules.conditions():
        compile_where(expr, kinds)  # a mistake is one line here, before any work
    rules.dedup = _dedup_rules(args)
    if rules.dedup is not None and rules.dedup.eval_cosine is not None:
        rules.clip_loader, rules.eval_clip = _eval_clip(args, parent)
    return rules, warnings


def _dedup_rules(args):
    if not (args.dedup_exact or args.dedup_pdq is not None or args.dedup_semantic is not None or args.decontaminate
            or args.decontaminate_cosine is not None):
        return None
    if args.dedup_pdq is not None and not 0 <= args.dedup_pdq <= 256:
        raise SubsetError(f"--dedup-pdq {args.dedup_pdq}: a Hamming radius in bits, 0 to 256")
    if args.dedup_semantic is not None and not -1.0 <= args.dedup_semantic <= 1.0:
        raise SubsetError(f"--dedup-semantic {args.dedup_semantic}: a cosine similarity, -1 to 1")
    try:
        from pipeline.dedup import DedupRules
    except ImportError:
        raise SubsetError("--dedup-*/--decontaminate need pipeline.dedup, which this kiln does not have yet") from None
    if args.decontaminate_cosine is not None:
        if not args.decontaminate:
            raise SubsetError(f"--decontaminate-cosine {args.decontaminate_cosine} needs --decontaminate PATH (the evaluation set)")
        if not -1.0 <= args.decontaminate_cosine <= 1.0:
            raise SubsetError(f"--decontaminate-cosine {args.decontaminate_cosine}: a cosine similarity, -1 to 1")
    return DedupRules(exact=args.dedup_exact, pdq_radius=args.dedup_pdq, semantic_cosine=args.dedup_semantic,
                      eval_set=args.decontaminate, eval_cosine=args.decontaminate_cosine)


def _eval_clip(args, parent: Parent):
    """--decontaminate-cosine: (a pipeline.dedup.ClipEmbedder, {spec, sha256}) for the parent's CLIP
    model, so the evaluation images are embedded as the stored samples were (as `kiln prepare` does).
    The model is what the parent's stats.json records under models.clip, unless --clip-model /
    --models name where it is now; it is loaded once here, and must be the parent's (same sha256)."""
    from pipeline.config import ClipConfig, ModelsConfig
    from pipeline.dedup import ClipEmbedder

    recorded = (parent.stats.get("models") or {}).get("clip")
    modes = parent.stats.get("stage_modes") or {}
    if not isinstance(recorded, dict) or modes.get("clip") == "off" or "clip_image_embedding" not in parent.meta_schema.names:
        raise SubsetError(f"--decontaminate-cosine: parent {parent.path} has no CLIP image embeddings (it was made with "
                          f"--clip off); decontaminate by PDQ only (leave out --decontaminate-cosine)")
    if args.clip_model or args.models:
        from pipeline.models.resolve import resolve

        given = args.clip_model or (recorded.get("provenance") or {}).get("spec") or recorded.get("spec")
        spec = resolve("clip", given, args.models).loader_spec  # a model that is not there: one line (UserError)
    else:
        spec = recorded.get("spec")
    if not spec:
        raise SubsetError(f"--decontaminate-cosine: parent {parent.path}'s stats.json names no CLIP model; pass --clip-model SPEC")
    loader = ClipEmbedder(ClipConfig(clip_mode="score", clip_model=spec, nsfw_mode="off"),
                          ModelsConfig(models=args.models, device=args.device))
    try:
        clip = loader()
    except UserError as err:
        raise SubsetError(f"--decontaminate-cosine: the parent's CLIP model cannot be loaded here ({err}); pass "
                          f"--clip-model SPEC or --models DIR where it is now") from None
    want = recorded.get("sha256")
    if want and clip.sha256 and clip.sha256 != want:
        raise SubsetError(f"--decontaminate-cosine: CLIP model {spec} (sha256 {clip.sha256[:12]}) is not the parent's "
                          f"(sha256 {want[:12]}): its embeddings are not comparable with the stored ones; pass the parent's model")
    return loader, {"spec": spec, "sha256": clip.sha256 or want}


def command_argv(args, beam_argv=()) -> list[str]:
    """The `kiln subset` argv that reproduces this child (--overwrite and --quiet left out)."""
    argv = [args.parent, "--out", args.out]
    for flag in ("--blocklist", "--optout-list", "--drop-uids", "--keep-uids"):
        for v in getattr(args, flag[2:].replace("-", "_")):
            argv += [flag, v]
    defaults = {"uid_col": "uid", "license_col": "LICENSE"}
    for dest in ("uid_col", "licenses", "license_col", "min_stored_size", "min_clip_similarity", "max_punsafe", "max_toxicity",
                 "where", "dedup_pdq", "dedup_semantic", "decontaminate", "decontaminate_cosine", "clip_model", "models",
                 "device"):
        v = getattr(args, dest)
        if v is not None and v != defaults.get(dest):
            argv += ["--" + dest.replace("_", "-"), str(v)]
    for dest in ("dedup_exact", "no_card"):
        if getattr(args, dest):
            argv.append("--" + dest.replace("_", "-"))
    return argv + list(beam_argv)


def run(args, beam_argv: list[str] = (), test_pipeline=None) -> dict:
    """Run `kiln subset`; returns the child's stats. SubsetError / ConfigError for a bad parent,
    output or rule (before any work), AccountingError if samples went missing."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import __version__
    from pipeline.card.summary import collection_period
    from pipeline.finalize import AccountingError, build_manifest, check_accounting, funnel_from, read_footers, write_json
    from pipeline.outdir import check_output, clear_output, remove_temp_files
    from pipeline.prepare import _beam_errors_reported_once, _counters, _git_commit, _raise_as_user_error, _read_stats, _versions

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.time()
    output = args.out.rstrip("/")
    _check_paths(args.parent, output)
    parent = read_parent(args.parent)
    rules, warnings = rules_from_args(args, parent)
    id_type = parent.meta_schema.field(rules.id_col).type if rules.id_col in parent.meta_schema.names else None
    fingerprint = _fingerprint(parent, rules)
    from pipeline.where import column_kinds

    plan = Plan(parent=parent.path, output=output, num_shards=parent.num_shards,
                parent_footers={i: {"tar": f["tar"], "samples": f["samples"]} for i, f in parent.footers.items()},
                meta_schema=parent.meta_schema, rejects_schema=rejects_schema(id_type), fingerprint=fingerprint,
                rules=rules, kinds=column_kinds(parent.meta_schema))
    card = not args.no_card
    check_output(output, args.overwrite, card)
    if args.overwrite:
        clear_output(output)
    elif FileSystems.exists(f"{output}/_SUCCESS"):
        stats = _read_stats(output)
        if stats.get("config_fingerprint") != fingerprint:
            raise SubsetError(f"{output} is complete but was made from another parent or other rules (fingerprint "
                              f"{stats.get('config_fingerprint')} != {fingerprint}); use --overwrite or another --out")
        if not args.quiet:
            print(f"kiln subset: {output} is already complete (_SUCCESS); nothing to do. Use --overwrite to redo it.")
        stats["this_run"] = {"skipped": True}
        return stats
    remove_temp_files(output)
    done_footers = read_footers(output)
    stale = sorted({f["config_fingerprint"] for f in done_footers.values()} - {fingerprint})
    if stale:
        raise SubsetError(f"{output} holds shards made from another parent or other rules (fingerprints {stale}, this run "
                          f"{fingerprint}); use --overwrite or another --out")
    done = set(done_footers)
    todo = [i for i in range(parent.num_shards) if i not in done]
    for w in warnings:
        print(f"kiln subset: warning: {w}", file=sys.stderr)
    if done and not args.quiet:
        print(f"kiln subset: resuming {output}: {len(done)} shard(s) already complete are skipped")

    options = PipelineOptions(list(beam_argv))
    p = test_pipeline if test_pipeline is not None else beam.Pipeline(runner=_local_runner(beam_argv), options=options)
    from pipeline.subset_job import build_pipeline

    build_pipeline(p, plan, todo)
    try:
        with _beam_errors_reported_once():  # a worker's error is reported once, as one line if it is the user's
            result = p.run()
            result.wait_until_finish()
    except BaseException as err:
        remove_temp_files(output)  # an interrupted or failed run leaves no partial file
        _raise_as_user_error(err, output)
        raise
    counters = _counters(result)
    footers = read_footers(output)
    input_rows = parent.kept
    stage_modes = {**(parent.stats.get("stage_modes") or {}), STAGE_SUBSET: "filter"}
    stats = {
        "kiln_version": __version__,
        "git_commit": _git_commit(),
        "config_fingerprint": fingerprint,
        "started_at": started.isoformat(),
        # The child's input is the parent's kept samples: its meta files, one row per sample.
        "input": {"pattern": parent.path, "rows": input_rows,
                  "files": [{"path": f"{parent.path}/{shard_path('meta', i)}", "rows": f["samples"],
                             "bytes": int(f.get("_meta_bytes") or 0)} for i, f in sorted(parent.footers.items())]},
        # The parent's settings (how its samples were collected and filtered): the card describes them.
        "flags": parent.flags,
        "command": shlex.join(["kiln", "subset", *command_argv(args, beam_argv)]),
        "stage_modes": stage_modes,
        "models": parent.stats.get("models") or {},
        "consent": parent.stats.get("consent") or {},
        "beam_options": options.get_all_options(drop_default=True),
        "versions": _versions(),
        "subset": {
            "parent": {"path": parent.path, "config_fingerprint": parent.fingerprint, "manifest_sha256": parent.manifest_sha256,
                       "card_sha256": parent.card_sha256, "input_rows": (parent.stats.get("input") or {}).get("rows"),
                       "kept": parent.kept, "funnel": parent.stats.get("funnel") or [],
                       "command": parent.stats.get("command"), "subset": parent.stats.get("subset"),
                       "collection_period": collection_period(parent.stats)},
            "rules": rules.describe(),
            "rule_order": ["blocklist", "optout_list", "drop_uids", "keep_uids", "licenses", "min_stored_size",
                           "thresholds", "where", "dedup"],
            "null_semantics": "SQL three-valued logic: a comparison with null is null; a sample is kept only when every "
                              "condition is true",
            "warnings": warnings,
        },
        "this_run": {"shards_skipped": len(done), "shards_written": counters.get("write/shards"), "counters": counters},
    }
    try:
        accounting = check_accounting(output, input_rows, footers, counters if not done else {})
    except AccountingError as err:
        stats["accounting"] = err.result
        stats["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        write_json(f"{output}/stats.json", stats)
        raise
    stats.update({
        "accounting": accounting,
        "funnel": funnel_from(input_rows, footers, stage_modes),
        "kept": accounting["kept"],
        "rejected": accounting["rejected"],
        "num_shards": len(footers),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "duration_s": round(time.time() - t0, 3),
    })
    write_json(f"{output}/manifest.json", build_manifest(footers))
    write_json(f"{output}/stats.json", stats)
    if card:
        from pipeline.card import write_card

        write_card(output)
    with FileSystems.create(f"{output}/_SUCCESS") as f:
        f.write(b"")
    if not args.quiet:
        print_summary(stats, output)
    return stats


def _local_runner(beam_argv):
    """Without --runner: Beam's FnApiRunner, in-process (or --direct_running_mode multi_processing).
    Beam 2.77's DirectRunner first tries its Prism runner, whose binary it downloads from GitHub: a
    job that promises no network access must not start that way. None: the --runner given."""
    if any(a == "--runner" or a.startswith("--runner=") for a in beam_argv):
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def print_summary(stats: dict, output: str) -> None:
    acc, sub = stats["accounting"], stats["subset"]
    n = acc["input_rows"]
    print(f"\nkiln subset: {sub['parent']['path']} ({n} samples) -> {output}: {acc['kept']} kept, {acc['rejected']} rejected")
    for st in stats["funnel"]:
        for reason, k in sorted(st["reasons"].items(), key=lambda kv: -kv[1]):
            print(f"      {st['stage']}/{reason:<24} {k:>7}")
    print(f"  accounting: parent samples == kept + rejected: {'OK' if acc['ok'] else 'FAILED'}")


# -- the command -------------------------------------------------------------------------------------


def add_subset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("parent", help="a finished kiln dataset (with _SUCCESS): a `kiln prepare` or `kiln subset` output")
    p.add_argument("--out", "--output", dest="out", required=True, help="the child dataset's directory (created if missing)")
    g = p.add_argument_group("rules (applied in this order; the first that fails names the reject reason)")
    g.add_argument("--blocklist", action="append", default=[], metavar="FILE",
                   help="a hash blocklist (kiln prepare's format), matched against the stored SAMPLE_ID, URL (sha256, md5, "
                        "domain), image_sha256 (of the stored image) and pdq_hash. image_md5 entries cannot be applied "
                        "(no md5 of the images is stored): they are counted, warned about and recorded in the card. Repeatable")
    g.add_argument("--optout-list", action="append", default=[], metavar="FILE",
                   help="an offline opt-out list (domains, URL prefixes) matched against the stored URL. Repeatable")
    g.add_argument("--drop-uids", action="append", default=[], metavar="FILE",
                   help="drop these: DataComp's .npy (sorted uint64 pairs, dtype \"u8,u8\"; also (n, 2) uint64 or hex "
                        "strings) or text, one per line. Repeatable")
    g.add_argument("--keep-uids", action="append", default=[], metavar="FILE",
                   help="keep only samples on one of these lists (same formats). Repeatable")
    g.add_argument("--uid-col", default="uid", help="the column the uid lists are matched against [uid: kiln's key]")
    g.add_argument("--licenses", default=None, metavar="A,B,...",
                   help="keep only these licence values (case-insensitive; a null licence is not allowed)")
    g.add_argument("--license-col", default="LICENSE", help="the licence column [LICENSE, LAION's]")
    g.add_argument("--min-stored-size", type=int, default=None, metavar="PX",
                   help="keep samples whose stored image's shorter side is at least PX")
    g.add_argument("--min-clip-similarity", type=float, default=None, help="same as --where 'clip_similarity >= X'")
    g.add_argument("--max-punsafe", type=float, default=None, help="same as --where 'punsafe <= X'")
    g.add_argument("--max-toxicity", type=float, default=None, help="same as --where 'toxicity <= X'")
    g.add_argument("--where", default=None, metavar="EXPR",
                   help="keep samples for which EXPR is true, e.g. \"clip_similarity >= 0.30 and punsafe < 0.1\": "
                        "columns, numbers, 'strings', and/or/not, = != < <= > >=, is [not] null, in (...), + - * /; "
                        "null compares as unknown, and unknown rejects (docs/subset.md)")
    d = p.add_argument_group("dedup (pipeline.dedup; over the samples that pass the rules above)")
    d.add_argument("--dedup-exact", action="store_true", help="drop samples whose stored image bytes equal a kept one's")
    d.add_argument("--dedup-pdq", type=int, default=None, metavar="RADIUS", help="drop near duplicates: PDQ Hamming distance <= RADIUS bits")
    d.add_argument("--dedup-semantic", type=float, default=None, metavar="COSINE",
                   help="drop semantic duplicates: CLIP image-embedding cosine >= COSINE")
    d.add_argument("--decontaminate", default=None, metavar="PATH",
                   help="drop samples near an image of this evaluation set (a folder of images or webdataset tars)")
    d.add_argument("--decontaminate-cosine", type=float, default=None, metavar="COSINE",
                   help="also drop samples whose stored CLIP image embedding has cosine >= COSINE with an evaluation "
                        "image's (embedded with the parent's CLIP model, as stats.json records it; needs a parent made "
                        "with --clip score or filter)")
    d.add_argument("--clip-model", default=None, metavar="SPEC",
                   help="where the parent's CLIP model is now, for --decontaminate-cosine (as kiln prepare's flag; it "
                        "must be the same weights) [the spec the parent's stats.json records]")
    d.add_argument("--models", default=None, metavar="DIR", help="a `kiln models fetch` folder holding the parent's CLIP model")
    d.add_argument("--device", default=None, help="torch device for the CLIP model [cuda if available, else cpu]")
    p.add_argument("--overwrite", action="store_true", help="redo the child (kiln deletes only its own files there)")
    p.add_argument("--no-card", action="store_true", help="skip README.md, croissant.json and the training summary")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def main_subset(args, beam_argv: list[str] = ()) -> int:
    """`kiln subset`: a user's mistake is one line (pipeline.cli), a failed accounting exit 1."""
    run(args, beam_argv)
    return 0
