"""Deduplication and decontamination: `kiln prepare --dedup*` / `--decontaminate`, and `kiln subset`.

Four rules over the small fields of each sample (`dedup_key`):

  exact          identical stored image bytes (`image_sha256`)
  pdq            PDQ perceptual hashes within a Hamming radius (re-encoded, resized, lightly edited
                 copies); hashes with `pdq_quality` < 50 are too flat to match and take no part
  semantic       CLIP image embeddings with cosine >= a threshold (crops, re-renders of a scene),
                 found as SemDeDup does (Abbas et al. 2023, §3): k-means on a sample of the
                 embeddings, every embedding assigned to its nearest centroids, exact cosine only
                 within each cluster, in blocks -- never all pairs
  eval_overlap   decontamination: a sample near any image of an evaluation set (PDQ within
                 `eval_pdq_radius`, or CLIP cosine >= `eval_cosine`) is removed

The keep rule. eval_overlap is a test of each sample against a fixed set, so it runs first: a
sample near an evaluation image is recorded as `eval_overlap` whatever else it duplicates. The
duplicate rules then make one graph (an edge = a pair within any enabled rule's radius), walked
once in rank order -- larger stored pixel area first, then higher `clip_similarity` (null last),
then smaller uid. A sample is kept unless it is within a radius of a member kept before it, or of
a `fixed` member (a resumed run's written shards; always kept). A removed sample names the
best-ranked kept member it is adjacent to (`duplicate_of`, always a kept sample), and its reason
is the first rule, in the order exact -> pdq -> semantic, under which the two are adjacent.

Why one graph rather than rule after rule: walked rule by rule, a sample removed as an exact copy
of B would name B even when B itself is then removed as a PDQ duplicate of C, and which of two
shards' samples a resumed run sees would change decisions. With one walk the kept set is an
independent set of the graph, each removal depends only on kept members, and a resumed run that
feeds its written (kept) samples as `fixed` decides every other sample exactly as an
uninterrupted run does (the semantic rule's clusters excepted: see `semantic_pairs`).

Scale (docs/running-at-scale.md has the measured costs): exact is a GroupByKey on sha256; PDQ is
multi-index hashing (`pdq_keys`: chunks of the 256 bits, a GroupByKey on (chunk, value), candidate
pairs verified by their true distance); semantic is a GroupByKey on cluster. Only the samples that
have a duplicate go further: their links (sample - value, value - value) are gathered in one worker
as int64 arrays (`COMPONENT_BYTES_PER_LINK`) for the connected components, and the walk runs per
component, spread over the workers.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
import tarfile
from dataclasses import asdict, dataclass

import apache_beam as beam
import numpy as np

from pipeline.records import DEDUP_REASONS

PDQ_MIN_QUALITY = 50  # PDQ's own cut: below it the image is too flat for its hash to mean anything
PDQ_BITS = 256
EVAL_PDQ_CHUNKS = 16  # 16-bit chunks for the evaluation index (small): one-bit probes reach radius 31
SEMANTIC_CLUSTER_SIZE = 10_000  # SemDeDup §3: ~50k clusters for LAION-440M, ~9k samples each
SEMANTIC_PROBES = 2  # clusters each embedding joins: a pair split by a boundary is still found
KMEANS_SAMPLE_PER_CLUSTER = 32  # k-means trains on ~32 x k embeddings, chosen by a hash of their id (deterministic)
KMEANS_ITERS = 20
BLOCK = 2048  # rows per block of the in-cluster cosine
COMPONENT_BYTES_PER_LINK = 16  # two int64 vertex ids; np.unique and the labels add ~3x that while it runs
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

EXACT, PDQ, SEMANTIC = "exact", "pdq", "semantic"
RULE_REASON = {EXACT: "duplicate_exact", PDQ: "duplicate_pdq", SEMANTIC: "duplicate_semantic"}
assert set(RULE_REASON.values()) | {"eval_overlap"} == set(DEDUP_REASONS)


@dataclass(frozen=True)
class DedupRules:
    exact: bool = False  # identical stored image bytes (image_sha256)
    pdq_radius: int | None = None  # near duplicates: PDQ Hamming distance <= radius (None = off)
    semantic_cosine: float | None = None  # semantic duplicates: CLIP image-embedding cosine >= this (None = off)
    eval_set: str | None = None  # decontamination: a folder of images, or a webdataset tar / folder of tars
    eval_pdq_radius: int = 31  # eval_overlap by PDQ
    eval_cosine: float | None = None  # eval_overlap by CLIP cosine as well (needs the dataset's CLIP model)

    def enabled(self) -> bool:
        return self.exact or self.pdq_radius is not None or self.semantic_cosine is not None or self.eval_set is not None

    def rules(self) -> tuple[str, ...]:
        """The duplicate rules that are on, in their order."""
        on = {EXACT: self.exact, PDQ: self.pdq_radius is not None, SEMANTIC: self.semantic_cosine is not None}
        return tuple(r for r in (EXACT, PDQ, SEMANTIC) if on[r])

    def describe(self) -> dict:
        return {
            **asdict(self),
            "pdq_min_quality": PDQ_MIN_QUALITY,
            "order": ["eval_overlap", *self.rules()],
            "keep_rule": ("eval_overlap first (each sample against the evaluation set); then one graph of the duplicate "
                          "rules walked in rank order: larger stored pixel area, then higher clip_similarity (null last), "
                          "then smaller uid; a sample within a radius of an already-kept (or fixed) sample is removed, "
                          "duplicate_of = the best-ranked kept sample it is within a radius of, reason = the first rule "
                          "(exact, pdq, semantic) that links the two"),
            "semantic_method": (f"SemDeDup: k-means (k = ceil(n / {SEMANTIC_CLUSTER_SIZE})) on ~{KMEANS_SAMPLE_PER_CLUSTER} x k "
                                f"embeddings chosen by a hash of their digest, each embedding in its {SEMANTIC_PROBES} nearest clusters, exact "
                                "cosine within clusters"),
        }


def rules_of(cfg) -> DedupRules:
    """The rules of `kiln prepare`'s settings (pipeline.config.DedupConfig)."""
    return DedupRules(exact="exact" in cfg.dedup, pdq_radius=cfg.pdq_radius if "pdq" in cfg.dedup else None,
                      semantic_cosine=cfg.cosine if "semantic" in cfg.dedup else None, eval_set=cfg.decontaminate,
                      eval_pdq_radius=cfg.eval_pdq_radius, eval_cosine=cfg.eval_cosine if cfg.decontaminate else None)


KEY_FIELDS = ("uid", "image_sha256", "pdq_hash", "pdq_quality", "clip_image_embedding", "stored_width", "stored_height",
              "clip_similarity")


def dedup_key(record: dict) -> dict:
    """The small fields dedup needs, from a prepare record or a meta-parquet row (missing -> None)."""
    out = {k: record.get(k) for k in KEY_FIELDS}
    if out["clip_image_embedding"] is not None:
        out["clip_image_embedding"] = bytes(out["clip_image_embedding"])
    return out


def rank_key(key: dict) -> tuple:
    """Smaller = better: kept first. Larger stored area, higher clip_similarity (null last), smaller uid."""
    area = (key.get("stored_width") or 0) * (key.get("stored_height") or 0)
    clip = key.get("clip_similarity")
    clip_ok = clip is not None and not (isinstance(clip, float) and math.isnan(clip))
    return (-area, 0 if clip_ok else 1, -(clip if clip_ok else 0.0), key["uid"])


# -- PDQ: multi-index hashing ---------------------------------------------------------------------


def pdq_int(hex_hash: str) -> int:
    return int(hex_hash, 16)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def pdq_usable(key: dict) -> bool:
    h, q = key.get("pdq_hash"), key.get("pdq_quality")
    return isinstance(h, str) and len(h) == 64 and q is not None and q >= PDQ_MIN_QUALITY


def _chunks(value: int, chunks: int) -> list[int]:
    bits = PDQ_BITS // chunks
    mask = (1 << bits) - 1
    return [(value >> (i * bits)) & mask for i in range(chunks)]


def _flips(value: int, bits: int, k: int):
    if k == 1:
        yield from (value ^ (1 << p) for p in range(bits))
        return
    for positions in itertools.combinations(range(bits), k):
        v = value
        for p in positions:
            v ^= 1 << p
        yield v


def pdq_keys(value: int, radius: int, chunks: int | None = None) -> tuple[list, list]:
    """(stored keys, probe keys) of a 256-bit hash for multi-index hashing (Norouzi et al. 2012).

    The hash is cut into `chunks` chunks; two hashes within `radius` differ in some chunk by at most
    s = radius // chunks bits (pigeonhole), so every pair within the radius meets under a key
    (chunk index, chunk value) that one stores and the other probes. Probe keys: every value within
    s bits of each chunk (chunks x sum_{k<=s} C(bits, k) keys; s = 0: the stored keys only).
    """
    chunks = chunks or pdq_chunks(radius)
    bits = PDQ_BITS // chunks
    s = radius // chunks
    parts = _chunks(value, chunks)
    stored = [(i, c) for i, c in enumerate(parts)]
    probes = [(i, v) for i, c in enumerate(parts) for k in range(1, s + 1) for v in _flips(c, bits, k)]
    return stored, probes


def pdq_chunks(radius: int) -> int:
    """Chunks for a radius, so that the sub-radius is at most 1 bit (probe keys stay ~17 per chunk):
    32-bit chunks up to radius 15 (exact keys below 8), 16-bit up to 31, 8-bit beyond."""
    return 8 if radius < 16 else 16 if radius < 32 else 32


def keys_per_hash(radius: int, chunks: int | None = None) -> int:
    chunks = chunks or pdq_chunks(radius)
    bits = PDQ_BITS // chunks
    return chunks * sum(math.comb(bits, k) for k in range(radius // chunks + 1))


def bucket_pairs(stored: list[int], probing: list[int], radius: int) -> list[tuple[int, int, int]]:
    """Verified pairs (a, b, distance), a < b, among the hashes stored under one key, and between the
    ones probing that key and the stored ones."""
    out = []
    stored = sorted(set(stored))
    for i, a in enumerate(stored):
        for b in stored[i + 1:]:
            d = hamming(a, b)
            if d <= radius:
                out.append((a, b, d))
    for p in set(probing):
        for b in stored:
            if p != b:
                d = hamming(p, b)
                if d <= radius:
                    out.append((min(p, b), max(p, b), d))
    return out


def pdq_pairs(values, radius: int, chunks: int | None = None) -> dict:
    """{(a, b): distance} for every pair of distinct hash values within `radius`, through the index
    (the in-memory form of what `Dedup` does with GroupByKeys)."""
    buckets: dict = {}
    for v in set(values):
        stored, probes = pdq_keys(v, radius, chunks)
        for k in stored:
            buckets.setdefault(k, ([], []))[0].append(v)
        for k in probes:
            buckets.setdefault(k, ([], []))[1].append(v)
    out = {}
    for stored, probing in buckets.values():
        if stored:
            for a, b, d in bucket_pairs(stored, probing, radius):
                out[(a, b)] = d
    return out


class PdqIndex:
    """A fixed set of named hashes (the evaluation set), queried one hash at a time."""

    def __init__(self, named: list[tuple[str, int]], radius: int, chunks: int = EVAL_PDQ_CHUNKS):
        self.radius, self.chunks = radius, chunks
        self.table: dict = {}
        for name, v in named:
            for k in pdq_keys(v, 0, chunks)[0]:
                self.table.setdefault(k, []).append((name, v))

    def query(self, value: int) -> tuple[str, int] | None:
        """(name, distance) of the nearest indexed hash within the radius (ties: smaller name), or None."""
        stored, probes = pdq_keys(value, self.radius, self.chunks)
        best = None
        for k in itertools.chain(stored, probes):
            for name, v in self.table.get(k, ()):
                d = hamming(value, v)
                if d <= self.radius and (best is None or (d, name) < (best[1], best[0])):
                    best = (name, d)
        return best


# -- semantic: SemDeDup-style clustering ----------------------------------------------------------


def embedding_of(key: dict) -> np.ndarray | None:
    b = key.get("clip_image_embedding")
    if not b:
        return None
    return np.frombuffer(b, "<f2").astype(np.float32)


def kmeans(x: np.ndarray, k: int, iters: int = KMEANS_ITERS, seed: int = 0) -> np.ndarray:
    """Spherical k-means (cosine) on unit rows `x`: [k, d] unit centroids. Deterministic for a given x."""
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    for _ in range(iters):
        assign = np.argmax(x @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        empty = norms[:, 0] == 0
        centroids = np.where(empty[:, None], centroids, sums / np.where(norms == 0, 1, norms))
    return centroids.astype(np.float32)


def nearest_clusters(x: np.ndarray, centroids: np.ndarray, probes: int = SEMANTIC_PROBES) -> np.ndarray:
    """[n, min(probes, k)] indices of each row's nearest centroids (by cosine)."""
    sims = x @ centroids.T
    p = min(probes, centroids.shape[0])
    if p == centroids.shape[0]:
        return np.argsort(-sims, axis=1, kind="stable")
    top = np.argpartition(-sims, p - 1, axis=1)[:, :p]
    return np.sort(top, axis=1)


def cluster_pairs(ids: list, x: np.ndarray, threshold: float, block: int = BLOCK) -> list[tuple]:
    """Exact pairs (ids[i], ids[j], cosine) with i < j and cosine >= threshold, in [block, block] tiles."""
    out = []
    n = len(ids)
    for s in range(0, n, block):
        sims = x[s:s + block] @ x[s:].T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i, j = s + r, s + c
            if j > i:
                out.append((ids[i], ids[j], float(sims[r, c])))
    return out


def in_kmeans_sample(value_id: str, n: int, cluster_size: int = SEMANTIC_CLUSTER_SIZE) -> bool:
    """Whether an embedding trains the k-means of n embeddings: a hash of its id below the share
    that gives ~KMEANS_SAMPLE_PER_CLUSTER x k of them (the same answer on every worker and runner)."""
    k = max(1, math.ceil(n / cluster_size))
    share = min(1.0, KMEANS_SAMPLE_PER_CLUSTER * k / max(n, 1))
    return (_id64("k", value_id) + 2**63) < share * 2**64


def semantic_pairs(ids: list, x: np.ndarray, threshold: float, cluster_size: int = SEMANTIC_CLUSTER_SIZE,
                   probes: int = SEMANTIC_PROBES, seed: int = 0) -> dict:
    """{(a, b): cosine} for pairs found by clustering (in-memory form of the Beam version): exact for
    every pair it reports, and finds all pairs when k = 1 (n <= cluster_size); otherwise a pair whose
    members share none of their `probes` nearest clusters is missed (bench/dedup.py measures the recall).
    The sample k-means trains on depends on how many samples are present (`in_kmeans_sample`): a
    resumed run can find a slightly different set of pairs when k > 1."""
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ids = [ids[i] for i in order]
    x = x[order]
    k = max(1, math.ceil(len(ids) / cluster_size))
    sample = [i for i, v in enumerate(ids) if in_kmeans_sample(v, len(ids), cluster_size)] or list(range(len(ids)))
    centroids = kmeans(x[sample], k, seed=seed)
    members: dict = {}
    for i, cs in enumerate(nearest_clusters(x, centroids, probes)):
        for c in cs.tolist():
            members.setdefault(c, []).append(i)
    out = {}
    for c in sorted(members):
        idx = members[c]
        for a, b, cos in cluster_pairs([ids[i] for i in idx], x[idx], threshold):
            out[(min(a, b), max(a, b))] = cos
    return out


def all_pairs_cosine(ids: list, x: np.ndarray, threshold: float) -> dict:
    """The baseline: every pair, in blocks."""
    return {(min(a, b), max(a, b)): c for a, b, c in cluster_pairs(ids, x, threshold)}


# -- the walk -------------------------------------------------------------------------------------


def solve(nodes: list[dict], edges: dict, rules: tuple[str, ...]) -> list[dict]:
    """The keep rule over the samples that have a duplicate.

    nodes: {"uid", "rank" (rank_key), "fixed", "values": {rule: value id}} -- value id: the sha256,
    PDQ hash or embedding digest, equal for samples identical under that rule.
    edges: {rule: {value: {other value: distance or cosine}}} between distinct values.
    Returns removal dicts {"uid", "reason", "duplicate_of", "detail"} (sorted by uid).
    """
    best: dict = {}  # (rule, value) -> (rank, uid, values) of the best-ranked kept member
    by_uid = {n["uid"]: n for n in nodes}

    def keep(n):
        for r, v in n["values"].items():
            cur = best.get((r, v))
            if cur is None or n["rank"] < cur[0]:
                best[(r, v)] = (n["rank"], n["uid"])

    for n in nodes:
        if n["fixed"]:
            keep(n)
    removed = []
    for n in sorted((n for n in nodes if not n["fixed"]), key=lambda n: n["rank"]):
        cands = []
        for r, v in n["values"].items():
            for w in itertools.chain((v,), edges.get(r, {}).get(v, ())):
                cur = best.get((r, w))
                if cur is not None and cur[1] != n["uid"]:
                    cands.append(cur)
        if not cands:
            keep(n)
            continue
        _, dup = min(cands)
        other = by_uid[dup]
        for r in rules:  # the first rule that links the two names the reason
            v, w = n["values"].get(r), other["values"].get(r)
            if v is None or w is None:
                continue
            if v == w:
                detail = {EXACT: f"image_sha256 {v[:16]}… equal", PDQ: "pdq distance 0",
                          SEMANTIC: "cosine 1.0000 (identical embedding)"}[r]
                break
            link = edges.get(r, {}).get(v, {}).get(w)
            if link is not None:
                detail = f"pdq distance {link}" if r == PDQ else f"cosine {link:.4f}"
                break
        removed.append({"uid": n["uid"], "reason": RULE_REASON[r], "duplicate_of": dup, "detail": detail})
    return sorted(removed, key=lambda d: d["uid"])


def _values(key: dict, rules: tuple[str, ...]) -> dict:
    out = {}
    if EXACT in rules and key.get("image_sha256"):
        out[EXACT] = key["image_sha256"]
    if PDQ in rules and pdq_usable(key):
        out[PDQ] = key["pdq_hash"].lower()
    if SEMANTIC in rules and key.get("clip_image_embedding"):
        out[SEMANTIC] = hashlib.sha256(key["clip_image_embedding"]).hexdigest()[:32]
    return out


def dedup_in_memory(keys: list[dict], rules: DedupRules, fixed: list[dict] = (), eval_index=None, clip_loader=None) -> list[dict]:
    """Everything `Dedup` does, in one process (tests, small data, the reference the Beam transform
    is tested against). `eval_index`: an `EvalIndex`; built from rules.eval_set (with `clip_loader`
    for rules.eval_cosine) when not given."""
    if eval_index is None and rules.eval_set is not None:
        eval_index = build_eval_index(rules, clip_loader)
    removed = []
    fixed_uids = {k["uid"] for k in fixed}
    live = []
    for k in keys:
        if k["uid"] in fixed_uids:
            continue
        hit = eval_index.match(k) if eval_index is not None else None
        if hit is not None:
            removed.append({"uid": k["uid"], "reason": "eval_overlap", "duplicate_of": hit[0], "detail": hit[1]})
        else:
            live.append(k)
    on = rules.rules()
    allk = [(k, False) for k in live] + [(k, True) for k in fixed]
    nodes = [{"uid": k["uid"], "rank": rank_key(k), "fixed": f, "values": _values(k, on)} for k, f in allk]
    edges: dict = {}
    if PDQ in on:
        vals = {n["values"][PDQ] for n in nodes if PDQ in n["values"]}
        for (a, b), d in pdq_pairs([pdq_int(v) for v in vals], rules.pdq_radius).items():
            ha, hb = f"{a:064x}", f"{b:064x}"
            edges.setdefault(PDQ, {}).setdefault(ha, {})[hb] = d
            edges[PDQ].setdefault(hb, {})[ha] = d
    if SEMANTIC in on:
        emb = {}
        for k, _ in allk:
            if k.get("clip_image_embedding"):
                emb.setdefault(_values(k, (SEMANTIC,))[SEMANTIC], embedding_of(k))
        ids = sorted(emb)
        if ids:
            x = np.stack([emb[i] for i in ids])
            for (a, b), c in semantic_pairs(ids, x, rules.semantic_cosine).items():
                edges.setdefault(SEMANTIC, {}).setdefault(a, {})[b] = c
                edges[SEMANTIC].setdefault(b, {})[a] = c
    return sorted(removed + solve(_involved(nodes, edges), edges, on), key=lambda d: d["uid"])


def _involved(nodes: list[dict], edges: dict) -> list[dict]:
    """The nodes that share a value with another node, or whose value has an edge."""
    count: dict = {}
    for n in nodes:
        for r, v in n["values"].items():
            count[(r, v)] = count.get((r, v), 0) + 1
    return [n for n in nodes if any(count[(r, v)] > 1 or v in edges.get(r, {}) for r, v in n["values"].items())]


# -- the evaluation set ---------------------------------------------------------------------------


def read_eval_images(path: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image of an evaluation set, sorted by name: a folder of images (names
    relative to it), a webdataset .tar (names `TAR:MEMBER`), or a folder holding .tar files."""
    from pipeline.config import ConfigError as UserError  # a usage error: exit 2, one line

    if not os.path.exists(path):
        raise UserError(f"--decontaminate {path}: no such file or folder; give a folder of images or a webdataset .tar")
    out = []
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(root, f)
                rel = os.path.relpath(full, path)
                if f.lower().endswith(IMAGE_EXTS):
                    with open(full, "rb") as fh:
                        out.append((rel, fh.read()))
                elif f.endswith(".tar"):
                    out += _tar_images(full, rel)
    elif path.endswith(".tar"):
        out = _tar_images(path, os.path.basename(path))
    else:
        raise UserError(f"--decontaminate {path}: not a folder or a .tar file")
    if not out:
        raise UserError(f"--decontaminate {path}: no images found (looked for {', '.join(IMAGE_EXTS)} files and .tar shards)")
    return sorted(out)


def _tar_images(path: str, label: str) -> list[tuple[str, bytes]]:
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile() and m.name.lower().endswith(IMAGE_EXTS):
                out.append((f"{label}:{m.name}", tar.extractfile(m).read()))
    return out


@dataclass
class EvalImage:
    name: str
    pdq_hash: str | None
    pdq_quality: int | None
    embedding: np.ndarray | None


def describe_eval_images(images: list[tuple[str, bytes]], embedder=None) -> list[EvalImage]:
    """PDQ (pipeline.blocklist.pdq_of) and, with `embedder` (an object with encode_images), the CLIP
    embedding of each evaluation image. An image that does not decode is left out (and named in the
    returned list with no hash)."""
    from pipeline.blocklist import pdq_of
    from pipeline.image import decode_image
    from pipeline.records import Reject

    out, pixels = [], []
    for name, data in images:
        try:
            bgr = decode_image(data).bgr
        except Reject:
            out.append(EvalImage(name, None, None, None))
            pixels.append(None)
            continue
        h, q = pdq_of(bgr, bgr=True)
        out.append(EvalImage(name, h, q, None))
        pixels.append(bgr)
    if embedder is not None:
        ok = [i for i, p in enumerate(pixels) if p is not None]
        if ok:
            emb = embedder.encode_images([pixels[i] for i in ok], channel_order="bgr")
            for j, i in enumerate(ok):
                out[i].embedding = emb[j].astype("<f2").astype(np.float32)  # as the dataset stores its own
    return out


class EvalIndex:
    """The evaluation set, ready to test samples against: a PDQ index and (optionally) embeddings."""

    def __init__(self, images: list[EvalImage], pdq_radius: int, cosine: float | None):
        self.names = [im.name for im in images]
        usable = [im for im in images if im.pdq_hash and (im.pdq_quality or 0) >= PDQ_MIN_QUALITY]
        self.pdq = PdqIndex([(im.name, pdq_int(im.pdq_hash)) for im in usable], pdq_radius)
        self.pdq_radius, self.cosine = pdq_radius, cosine
        emb = [im for im in images if im.embedding is not None]
        self.emb_names = [im.name for im in emb]
        self.emb = np.stack([im.embedding for im in emb]) if emb and cosine is not None else None

    def match(self, key: dict) -> tuple[str, str] | None:
        """(eval image name, detail) of the evaluation image the sample is near, or None. PDQ first,
        then CLIP cosine (the highest)."""
        if pdq_usable(key):
            hit = self.pdq.query(pdq_int(key["pdq_hash"]))
            if hit is not None:
                return hit[0], f"pdq distance {hit[1]} <= {self.pdq_radius}"
        if self.emb is not None:
            e = embedding_of(key)
            if e is not None and len(e) == self.emb.shape[1]:
                sims = self.emb @ e
                j = int(np.argmax(sims))
                if sims[j] >= self.cosine:
                    return self.emb_names[j], f"cosine {float(sims[j]):.4f} >= {self.cosine}"
        return None


class ClipEmbedder:
    """A picklable loader of the dataset's CLIP model (pipeline.model_stages), for the eval set."""

    def __init__(self, clip_cfg, models_cfg):
        self.clip_cfg, self.models_cfg = clip_cfg, models_cfg

    def __call__(self):
        import dataclasses

        from pipeline.model_stages import load_image_models

        clip, _ = load_image_models(dataclasses.replace(self.clip_cfg, nsfw_mode="off"), self.models_cfg)
        return clip


def build_eval_index(rules: DedupRules, clip_loader=None) -> EvalIndex:
    images = read_eval_images(rules.eval_set)
    embedder = clip_loader() if (clip_loader is not None and rules.eval_cosine is not None) else None
    return EvalIndex(describe_eval_images(images, embedder), rules.eval_pdq_radius, rules.eval_cosine)


# -- Beam -----------------------------------------------------------------------------------------


class _EvalMatch(beam.DoFn):
    def __init__(self, rules: DedupRules, clip_loader):
        self.rules, self.clip_loader = rules, clip_loader

    def setup(self):
        self.index = build_eval_index(self.rules, self.clip_loader)  # once per worker: the eval set is small

    def process(self, key):
        hit = self.index.match(key)
        if hit is None:
            yield key
        else:
            yield beam.pvalue.TaggedOutput("removed", {"uid": key["uid"], "reason": "eval_overlap", "duplicate_of": hit[0],
                                                       "detail": hit[1]})


def _pdq_bucket_edges(kv, radius):
    _, items = kv
    stored = [pdq_int(v) for tag, v in items if tag == "s"]
    probing = [pdq_int(v) for tag, v in items if tag == "p"]
    if not stored or len(stored) + len(probing) < 2:
        return
    for a, b, d in bucket_pairs(stored, probing, radius):
        yield (f"{a:064x}", f"{b:064x}", d)


def _pdq_key_elements(value_hex, radius, chunks):
    # Hashes travel as hex: Beam's integer coder holds 64 bits, not 256.
    stored, probes = pdq_keys(pdq_int(value_hex), radius, chunks)
    for k in stored:
        yield k, ("s", value_hex)
    for k in probes:
        yield k, ("p", value_hex)


def _kmeans_from_sample(sample, n):
    """Centroids from the sampled (value id, embedding) pairs, sorted: the same list gives the same centroids."""
    if not sample:
        return np.zeros((1, 1), np.float32)
    sample = sorted(sample)
    x = np.stack([np.frombuffer(b, "<f2").astype(np.float32) for _, b in sample])
    return kmeans(x, max(1, math.ceil(n / SEMANTIC_CLUSTER_SIZE)))


def _assign(batch, centroids):
    x = np.stack([np.frombuffer(b, "<f2").astype(np.float32) for _, b in batch])
    for (vid, b), cs in zip(batch, nearest_clusters(x, centroids)):
        for c in cs.tolist():
            yield int(c), (vid, b)


def _cluster_edges(kv, threshold):
    _, items = kv
    items = sorted(set(items))
    if len(items) < 2:
        return
    x = np.stack([np.frombuffer(b, "<f2").astype(np.float32) for _, b in items])
    for a, b, c in cluster_pairs([v for v, _ in items], x, threshold):
        yield (min(a, b), max(a, b), c)


def _mark_involved(kv):
    """(rule, value) -> its members and edges; emit the members' uids when they have a duplicate."""
    (_rule, _value), grouped = kv
    members, linked = list(grouped["members"]), list(grouped["edges"])
    if len(members) > 1 or linked:
        for uid in members:
            yield uid


def _solve_component(parts, rules):
    nodes, edges = [], {}
    for tag, item in parts:
        if tag == "n":
            nodes.append(item)
        else:
            rule, a, b, d = item
            edges.setdefault(rule, {}).setdefault(a, {})[b] = d
            edges[rule].setdefault(b, {})[a] = d
    return solve(sorted(nodes, key=lambda n: n["uid"]), edges, rules)


def _id64(kind: str, value: str) -> int:
    """A graph vertex as a signed 64-bit integer. A collision can only merge two components, which
    leaves every decision as it is (the walk looks at neighbours only)."""
    return int.from_bytes(hashlib.blake2b(f"{kind}:{value}".encode(), digest_size=8).digest(), "little", signed=True)


class _LinksToArray(beam.CombineFn):
    """All links as int64 arrays (16 bytes a link, not a Python tuple's ~100)."""

    def create_accumulator(self):
        return ([], [])

    def add_input(self, acc, link):
        arrays, buf = acc
        buf.append(link)
        if len(buf) >= 65536:
            arrays.append(np.asarray(buf, dtype=np.int64).reshape(-1, 2))
            buf.clear()
        return acc

    def merge_accumulators(self, accs):
        arrays, buf = [], []
        for a, b in accs:
            arrays += a
            buf += b
        return (arrays, buf)

    def extract_output(self, acc):
        arrays, buf = acc
        parts = arrays + ([np.asarray(buf, dtype=np.int64).reshape(-1, 2)] if buf else [])
        return np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)


def connected_components(links: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vertex ids, component label of each): label = the smallest vertex index of its component.
    Min-label propagation with pointer jumping, in numpy."""
    ids, inv = np.unique(links.reshape(-1), return_inverse=True)
    a, b = inv.reshape(-1, 2).T
    label = np.arange(len(ids))
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:  # pointer jumping: follow labels to their own labels
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return ids, label
        label = new


def _component_roots(links: np.ndarray):
    if len(links) == 0:
        return
    ids, label = connected_components(links)
    for vid, root in zip(ids.tolist(), ids[label].tolist()):
        yield vid, root


class Dedup(beam.PTransform):
    """keys: PCollection of dedup_key dicts -> PCollection of removal dicts
    {"uid", "reason" (one of records.DEDUP_REASONS), "duplicate_of" (kept uid, or eval image name), "detail"}.
    Only removed samples are emitted. `fixed`: optional PCollection of dedup_key dicts that are kept
    no matter what (a resumed prepare run's already-written shards) and that others can duplicate.
    `clip_loader`: a picklable callable returning an object with `encode_images` (ClipEmbedder), for
    rules.eval_cosine."""

    def __init__(self, rules: DedupRules, clip_loader=None, fixed=None):
        super().__init__()
        self.rules, self.clip_loader, self.fixed = rules, clip_loader, fixed

    def expand(self, keys):
        rules = self.rules
        on = rules.rules()
        p = keys.pipeline
        removed = []
        if rules.eval_set is not None:
            ev = keys | "EvalOverlap" >> beam.ParDo(_EvalMatch(rules, self.clip_loader)).with_outputs("removed", main="main")
            keys, removed = ev.main, [ev.removed]
        fixed = self.fixed if self.fixed is not None else p | "NoFixed" >> beam.Create([])
        nodes = (
            (keys | "TagLive" >> beam.Map(lambda k: (k, False)), fixed | "TagFixed" >> beam.Map(lambda k: (k, True)))
            | "AllKeys" >> beam.Flatten()
            | "Node" >> beam.Map(lambda kf, on=on: {"uid": kf[0]["uid"], "rank": rank_key(kf[0]), "fixed": kf[1],
                                                    "values": _values(kf[0], on), "emb": kf[0].get("clip_image_embedding")})
        )
        memberships = nodes | "Memberships" >> beam.FlatMap(lambda n: [((r, v), n["uid"]) for r, v in n["values"].items()])
        edge_lists = []
        if PDQ in on:
            radius = rules.pdq_radius
            pdq_edges = (
                nodes
                | "PdqValues" >> beam.FlatMap(lambda n: [n["values"][PDQ]] if PDQ in n["values"] else [])
                | "DistinctPdq" >> beam.Distinct()
                | "PdqKeys" >> beam.FlatMap(_pdq_key_elements, radius, pdq_chunks(radius))
                | "GroupPdqChunks" >> beam.GroupByKey()
                | "VerifyPdqPairs" >> beam.FlatMap(_pdq_bucket_edges, radius)
                | "DistinctPdqPairs" >> beam.Distinct()
                | "TagPdq" >> beam.Map(lambda e: (PDQ, *e))
            )
            edge_lists.append(pdq_edges)
        if SEMANTIC in on:
            threshold = rules.semantic_cosine
            values = (
                nodes
                | "EmbValues" >> beam.FlatMap(lambda n: [(n["values"][SEMANTIC], n["emb"])] if SEMANTIC in n["values"] else [])
                | "DistinctEmb" >> beam.Distinct()
            )
            n_values = values | "CountEmb" >> beam.combiners.Count.Globally()
            # The k-means sample: a hash of each value id against the share that gives ~32 x k of them.
            sample = (values
                      | "KMeansSample" >> beam.Filter(lambda vb, n: in_kmeans_sample(vb[0], n), beam.pvalue.AsSingleton(n_values))
                      | "SampleList" >> beam.combiners.ToList())
            centroids = sample | "KMeans" >> beam.Map(_kmeans_from_sample, beam.pvalue.AsSingleton(n_values))
            sem_edges = (
                values
                | "BatchEmb" >> beam.BatchElements(min_batch_size=1, max_batch_size=4096)
                | "AssignClusters" >> beam.FlatMap(_assign, beam.pvalue.AsSingleton(centroids))
                | "GroupClusters" >> beam.GroupByKey()
                | "ClusterCosine" >> beam.FlatMap(_cluster_edges, threshold)
                | "DistinctSemPairs" >> beam.Distinct()
                | "TagSemantic" >> beam.Map(lambda e: (SEMANTIC, *e))
            )
            edge_lists.append(sem_edges)
        edges = (edge_lists or [p | "NoEdges" >> beam.Create([])]) | "AllEdges" >> beam.Flatten()
        edge_ends = edges | "EdgeEnds" >> beam.FlatMap(lambda e: [((e[0], e[1]), 1), ((e[0], e[2]), 1)])
        involved = (
            {"members": memberships, "edges": edge_ends}
            | "JoinValues" >> beam.CoGroupByKey()
            | "Involved" >> beam.FlatMap(_mark_involved)
            | "DistinctInvolved" >> beam.Distinct()
            | "KeyInvolved" >> beam.Map(lambda uid: (uid, True))
        )
        involved_nodes = (
            {"node": nodes | "KeyNodes" >> beam.Map(lambda n: (n["uid"], {k: v for k, v in n.items() if k != "emb"})),
             "involved": involved}
            | "JoinInvolved" >> beam.CoGroupByKey()
            | "InvolvedNodes" >> beam.FlatMap(lambda kv: list(kv[1]["node"])[:1] if kv[1]["involved"] else [])
        )
        # Connected components of the samples with a duplicate (one worker, numpy: COMPONENT_BYTES_PER_LINK
        # per link), then the walk per component, spread over workers: a GroupByKey on the root.
        links = (
            (involved_nodes | "NodeLinks" >> beam.FlatMap(lambda n: [(_id64("u", n["uid"]), _id64(r, v)) for r, v in n["values"].items()]),
             edges | "EdgeLinks" >> beam.Map(lambda e: (_id64(e[0], e[1]), _id64(e[0], e[2]))))
            | "AllLinks" >> beam.Flatten()
        )
        roots = (
            links
            | "Components" >> beam.CombineGlobally(_LinksToArray())
            | "Roots" >> beam.FlatMap(_component_roots)
        )
        node_roots = (
            {"node": involved_nodes | "KeyNodeId" >> beam.Map(lambda n: (_id64("u", n["uid"]), n)), "root": roots}
            | "JoinNodeRoots" >> beam.CoGroupByKey()
            | "NodeByRoot" >> beam.FlatMap(lambda kv: [(r, ("n", n)) for n in kv[1]["node"] for r in kv[1]["root"]])
        )
        edge_roots = (
            {"edge": edges | "KeyEdgeId" >> beam.Map(lambda e: (_id64(e[0], e[1]), e)), "root": roots}
            | "JoinEdgeRoots" >> beam.CoGroupByKey()
            | "EdgeByRoot" >> beam.FlatMap(lambda kv: [(r, ("e", e)) for e in kv[1]["edge"] for r in kv[1]["root"]])
        )
        dup_removed = (
            (node_roots, edge_roots)
            | "GraphParts" >> beam.Flatten()
            | "GroupComponents" >> beam.GroupByKey()
            | "KeepRule" >> beam.FlatMap(lambda kv, on=on: _solve_component(kv[1], on))
        )
        return [*removed, dup_removed] | "AllRemoved" >> beam.Flatten()


# -- `kiln prepare`'s stage -----------------------------------------------------------------------


def read_meta_keys(path: str) -> list[dict]:
    """dedup_key of every row of a written meta/NNNNNN.parquet (a resumed run's `fixed` samples)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        pf = pq.ParquetFile(io.BytesIO(f.read()))
    cols = [c for c in KEY_FIELDS if c in pf.schema_arrow.names]
    return [dedup_key(r) for r in pf.read(columns=cols).to_pylist()]


class _ApplyRemovals(beam.DoFn):
    def __init__(self, columns):
        self.columns = columns

    def setup(self):
        from pipeline.stage import StageCounters
        from pipeline.records import STAGE_DEDUP

        self.counters = StageCounters(STAGE_DEDUP)

    def process(self, kv):
        from pipeline.records import STAGE_DEDUP, Reject, reject_row

        _, grouped = kv
        records, removed = list(grouped["record"]), list(grouped["removed"])
        for record in records:  # one: uids are unique after the prefilter
            self.counters.n_in.inc()
            if not removed:
                self.counters.n_out.inc()
                yield record
                continue
            d = removed[0]
            rej = Reject(STAGE_DEDUP, d["reason"], d["detail"], duplicate_of=d["duplicate_of"])
            self.counters.reject(rej)
            yield beam.pvalue.TaggedOutput("rejects", reject_row(record, rej, self.columns.url_col, self.columns.id_col))


class DedupStage(beam.PTransform):
    """`kiln prepare --dedup/--decontaminate`: records -> {"main": kept records, "rejects": reject rows}.

    `fixed_meta_paths`: the meta parquet files of shards already complete on disk (a resumed run):
    their samples are kept and others can be their duplicates, so decisions do not change."""

    def __init__(self, rules: DedupRules, columns, clip_loader=None, fixed_meta_paths=()):
        super().__init__()
        self.rules, self.columns, self.clip_loader, self.fixed_meta_paths = rules, columns, clip_loader, tuple(fixed_meta_paths)

    def expand(self, records):
        p = records.pipeline
        fixed = None
        if self.fixed_meta_paths:
            fixed = (p | "WrittenShards" >> beam.Create(sorted(self.fixed_meta_paths))
                     | "ReadWrittenKeys" >> beam.FlatMap(read_meta_keys))
        removed = (records | "Keys" >> beam.Map(dedup_key)
                   | "Find" >> Dedup(self.rules, self.clip_loader, fixed)
                   | "KeyRemoved" >> beam.Map(lambda d: (d["uid"], d)))
        out = (
            {"record": records | "KeyRecords" >> beam.Map(lambda r: (r["uid"], r)), "removed": removed}
            | "JoinDecisions" >> beam.CoGroupByKey()
            | "Apply" >> beam.ParDo(_ApplyRemovals(self.columns)).with_outputs("rejects", main="main")
        )
        return {"main": out.main, "rejects": out.rejects}


def eval_set_digest(path: str) -> str:
    """sha256 over the evaluation set's (name, bytes): part of the run's fingerprint."""
    h = hashlib.sha256()
    for name, data in read_eval_images(path):
        h.update(name.encode("utf-8", "surrogatepass") + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()
