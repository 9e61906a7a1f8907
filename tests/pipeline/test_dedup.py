"""Deduplication and decontamination (pipeline/dedup.py): the index and the clustering against brute
force, the keep rule by hand, the Beam transform against the in-memory one, and `kiln prepare
--dedup/--decontaminate` end to end on a synthetic web with planted duplicates (served from 127.0.0.1).

What a tiny CLIP model finds similar is not asserted as such (PITFALLS.md): the semantic run's
removals are derived from a scoring run's stored embeddings through the in-memory reference.
"""

import random
import shutil
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import ConfigError, parse_prepare
from pipeline.dedup import (Dedup, DedupRules, EvalIndex, EvalImage, PdqIndex, all_pairs_cosine, dedup_in_memory, dedup_key,
                            hamming, keys_per_hash, pdq_pairs, rank_key, rules_of, semantic_pairs)
from pipeline.testbed import prepare_config
from pipeline.prepare import run
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import DUPE_KINDS, synthesize, write_eval_folder


# -- pure functions ------------------------------------------------------------------------------


def _hashes(n, planted, max_flip, seed=0):
    rng = random.Random(seed)
    base = [rng.getrandbits(256) for _ in range(n)]
    near = []
    for v in base[:planted]:
        for p in rng.sample(range(256), rng.randint(0, max_flip)):
            v ^= 1 << p
        near.append(v)
    return base + near


def _brute(values, radius):
    s = sorted(set(values))
    return {(a, b): hamming(a, b) for i, a in enumerate(s) for b in s[i + 1:] if hamming(a, b) <= radius}


@pytest.mark.parametrize("radius", [1, 7, 15, 31])
def test_pdq_index_finds_exactly_the_pairs_brute_force_finds(radius):
    values = _hashes(500, 120, 2 * radius + 2, seed=radius)
    want = _brute(values, radius)
    assert len(want) >= 10  # planted pairs on both sides of the radius
    assert pdq_pairs(values, radius) == want


def test_pdq_keys_per_hash_stay_small_up_to_radius_31():
    assert [keys_per_hash(r) for r in (0, 7, 8, 15, 16, 31)] == [8, 8, 264, 264, 272, 272]


def test_pdq_index_query_returns_the_nearest_within_radius():
    values = _hashes(300, 60, 40, seed=5)
    named = [(f"e{i:03d}", v) for i, v in enumerate(values[:300])]
    index = PdqIndex(named, 31)
    for q in values[300:]:
        dists = sorted((hamming(q, v), name) for name, v in named)
        want = (dists[0][1], dists[0][0]) if dists[0][0] <= 31 else None
        assert index.query(q) == want


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_semantic_clustering_finds_the_brute_force_pairs():
    rng = np.random.default_rng(0)
    # 40 "topics", 3000 points around them, 300 planted near copies.
    topics = _unit(rng.normal(size=(40, 64)))
    x = _unit(topics[rng.integers(0, 40, 3000)] + 0.35 * rng.normal(size=(3000, 64)))
    copies = _unit(x[:300] + 0.01 * rng.normal(size=(300, 64)))
    x = np.concatenate([x, copies])
    ids = [f"u{i:05d}" for i in range(len(x))]
    want = all_pairs_cosine(ids, x, 0.97)
    got = semantic_pairs(ids, x, 0.97, cluster_size=300)  # k = 11 clusters
    assert len(want) >= 300
    assert set(got) <= set(want) and all(abs(got[p] - want[p]) < 1e-5 for p in got)  # every reported pair is exact
    recall = len(got) / len(want)
    assert recall >= 0.99, recall
    # One cluster (n <= cluster_size): exactly all pairs.
    assert semantic_pairs(ids[:1000], x[:1000], 0.9, cluster_size=1000) == all_pairs_cosine(ids[:1000], x[:1000], 0.9)


def test_connected_components_equal_union_find():
    from pipeline.dedup import connected_components

    rng = np.random.default_rng(7)
    v = rng.integers(-(2**62), 2**62, size=400, dtype=np.int64)
    links = v[rng.integers(0, 400, size=(200, 2))]  # up to 400 vertices, 200 random edges: many components
    links = np.concatenate([links, np.array([[5, 5], [2**63 - 1, -(2**63)]], dtype=np.int64)])
    ids, label = connected_components(links)
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in links.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    want = {v: find(v) for v in ids.tolist()}
    got = dict(zip(ids.tolist(), ids[label].tolist()))
    assert got == want  # roots: the smallest id of each component, as union by min gives
    assert len(set(got.values())) > 50


def _key(uid, sha=None, pdq=None, q=100, emb=None, side=256, clip=None):
    return {"uid": uid, "image_sha256": sha, "pdq_hash": pdq, "pdq_quality": q, "clip_image_embedding": emb,
            "stored_width": side, "stored_height": side, "clip_similarity": clip}


def _pdq_hex(v):
    return f"{v:064x}"


def test_keep_rule_by_hand():
    base = random.Random(1).getrandbits(256)
    near8 = base ^ 0xFF  # 8 bits from base
    far_from_base = near8 ^ (0xFF << 100)  # 8 from near8, 16 from base
    keys = [
        # an exact group of three: the larger image is kept, then the higher clip_similarity
        _key("a1", sha="s1", side=200, clip=0.9), _key("a2", sha="s1", side=256, clip=0.1), _key("a3", sha="s1", side=256, clip=0.3),
        # a PDQ chain b1 - b2 - b3 (radius 10): b1 kept, b2 removed, b3 not within radius of b1: kept
        _key("b1", pdq=_pdq_hex(base)), _key("b2", pdq=_pdq_hex(near8), side=200), _key("b3", pdq=_pdq_hex(far_from_base), side=100),
        # too flat to match: kept although the hash is equal
        _key("c1", pdq=_pdq_hex(base), q=20, side=50),
        # null clip ranks after any clip value
        _key("d1", sha="s2", clip=None), _key("d2", sha="s2", clip=-0.5),
    ]
    got = dedup_in_memory(keys, DedupRules(exact=True, pdq_radius=10))
    assert [(d["uid"], d["reason"], d["duplicate_of"]) for d in got] == [
        ("a1", "duplicate_exact", "a3"), ("a2", "duplicate_exact", "a3"), ("b2", "duplicate_pdq", "b1"), ("d1", "duplicate_exact", "d2"),
    ]
    assert got[2]["detail"] == "pdq distance 8"
    # A fixed sample is kept whatever its rank, and others become its duplicates.
    got = dedup_in_memory([k for k in keys if k["uid"] != "a2"], DedupRules(exact=True), fixed=[keys[1]])
    assert [(d["uid"], d["duplicate_of"]) for d in got] == [("a1", "a2"), ("a3", "a2"), ("d1", "d2")]


def test_one_graph_names_a_kept_sample_even_across_rules():
    # x1 and x2 are byte-identical; x2's hash is also 4 bits from y, which outranks both.
    h = random.Random(2).getrandbits(256)
    keys = [_key("x1", sha="s", pdq=_pdq_hex(h ^ 0xF), side=200), _key("x2", sha="s", pdq=_pdq_hex(h ^ 0xF), side=200),
            _key("y", pdq=_pdq_hex(h), side=256)]
    got = dedup_in_memory(keys, DedupRules(exact=True, pdq_radius=8))
    # Rule by rule, x2 would be x1's exact duplicate and x1 then y's PDQ duplicate: x2 would name a removed sample.
    assert [(d["uid"], d["reason"], d["duplicate_of"]) for d in got] == [("x1", "duplicate_pdq", "y"), ("x2", "duplicate_pdq", "y")]


def _random_keys(n, seed):
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    hashes = _hashes(n // 2, n // 4, 24, seed=seed)
    emb = _unit(nrng.normal(size=(n, 32)))
    emb[n // 2:] = _unit(emb[: n - n // 2] + 0.02 * nrng.normal(size=(n - n // 2, 32)))
    keys = []
    for i in range(n):
        h = hashes[i % len(hashes)]
        keys.append(_key(f"{rng.getrandbits(64):016x}", sha=f"s{rng.randrange(n // 2)}", pdq=_pdq_hex(h), q=rng.choice((40, 90, 90, 90)),
                         emb=emb[i].astype("<f2").tobytes(), side=rng.choice((128, 200, 256)),
                         clip=rng.choice((None, round(rng.uniform(0, 1), 3)))))
    return keys


RULES = DedupRules(exact=True, pdq_radius=16, semantic_cosine=0.97)


def test_resumed_decisions_equal_the_uninterrupted_ones():
    keys = _random_keys(400, 3)
    full = {d["uid"]: d for d in dedup_in_memory(keys, RULES)}
    assert {d["reason"] for d in full.values()} == {"duplicate_exact", "duplicate_pdq", "duplicate_semantic"}
    done = {k["uid"] for k in keys if int(k["uid"], 16) % 3 == 0}  # "shards already on disk"
    fixed = [k for k in keys if k["uid"] in done and k["uid"] not in full]
    rest = [k for k in keys if k["uid"] not in done]
    resumed = {d["uid"]: d for d in dedup_in_memory(rest, RULES, fixed=fixed)}
    assert resumed == {u: d for u, d in full.items() if u not in done}


def test_duplicate_of_is_always_a_kept_sample():
    keys = _random_keys(400, 4)
    removed = {d["uid"]: d for d in dedup_in_memory(keys, RULES)}
    assert removed and all(d["duplicate_of"] not in removed for d in removed.values())
    kept = [k for k in keys if k["uid"] not in removed]
    assert dedup_in_memory(kept, RULES) == []  # no two kept samples are duplicates


def test_beam_transform_equals_the_in_memory_one():
    keys = _random_keys(200, 5)
    fixed = keys[:20]
    want = dedup_in_memory(keys[20:], RULES, fixed=fixed)
    assert len(want) > 10
    with TestPipeline() as p:
        got = p | "Keys" >> beam.Create(keys[20:]) | Dedup(RULES, fixed=p | "Fixed" >> beam.Create(fixed))
        assert_that(got, equal_to(want))


def test_beam_decontamination_alone(tmp_path):
    from PIL import Image

    from pipeline.blocklist import pdq_of

    rng = np.random.default_rng(3)
    pics = [np.asarray(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((96, 96), Image.BICUBIC))
            for _ in range(3)]
    (tmp_path / "ev").mkdir()
    Image.fromarray(pics[0]).save(tmp_path / "ev" / "a.png")
    keys = [_key(f"s{i}", pdq=pdq_of(p, bgr=False)[0], q=pdq_of(p, bgr=False)[1]) for i, p in enumerate(pics)]
    assert all(k["pdq_quality"] >= 50 for k in keys)
    with TestPipeline() as p:
        got = p | beam.Create(keys) | Dedup(DedupRules(eval_set=str(tmp_path / "ev")))
        assert_that(got, equal_to([{"uid": "s0", "reason": "eval_overlap", "duplicate_of": "a.png", "detail": "pdq distance 0 <= 31"}]))


def test_eval_index_matches_by_pdq_and_by_cosine():
    h = random.Random(9).getrandbits(256)
    e = _unit(np.random.default_rng(9).normal(size=(2, 16)))
    index = EvalIndex([EvalImage("a.png", _pdq_hex(h), 90, e[0]), EvalImage("flat.png", _pdq_hex(h ^ 1), 10, None),
                       EvalImage("b.png", None, None, e[1])], 31, 0.9)
    assert index.match(_key("s", pdq=_pdq_hex(h ^ 0xFFFF))) == ("a.png", "pdq distance 16 <= 31")
    assert index.match(_key("s", pdq=_pdq_hex(h ^ (2**40 - 1)))) is None
    assert index.match(_key("s", pdq=_pdq_hex(h), q=30)) is None  # a flat sample never matches by PDQ
    got = index.match(_key("s", emb=e[1].astype("<f2").tobytes()))
    assert got[0] == "b.png" and got[1].startswith("cosine 0.99")  # float16 storage


def test_rank_key_orders_area_then_clip_then_uid():
    ks = [_key("c", side=100, clip=0.9), _key("b", side=256, clip=None), _key("a", side=256, clip=None), _key("d", side=256, clip=0.2)]
    assert [k["uid"] for k in sorted(ks, key=rank_key)] == ["d", "a", "b", "c"]


def test_dedup_flags_are_checked():
    cfg, _ = parse_prepare(["--input", "i", "--output", "o", "--dedup", "exact,pdq", "--decontaminate", "ev"])
    assert rules_of(cfg.dedup) == DedupRules(exact=True, pdq_radius=15, eval_set="ev")
    for argv, words in ((["--dedup", "exact,fuzzy"], "not a rule"), (["--dedup", "semantic", "--clip", "off", "--nsfw", "off"], "--clip score"),
                        (["--decontaminate-cosine", "0.9"], "needs --decontaminate")):
        with pytest.raises(ConfigError, match=words):
            parse_prepare(["--input", "i", "--output", "o", *argv])


def test_eval_set_problems_are_one_line(tmp_path):
    from pipeline.dedup import read_eval_images

    with pytest.raises(ConfigError, match="no such file or folder"):
        read_eval_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match="no images found"):
        read_eval_images(str(tmp_path / "empty"))
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    with tarfile.open(tmp_path / "eval.tar", "w") as tar:
        info = tarfile.TarInfo("k1.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    assert read_eval_images(str(tmp_path / "eval.tar")) == [("eval.tar:k1.png", buf.getvalue())]


def test_dedup_key_reads_meta_rows():
    row = {"uid": "u", "image_sha256": "s", "pdq_hash": "0" * 64, "pdq_quality": 80, "clip_image_embedding": memoryview(b"\0\0"),
           "stored_width": 3, "stored_height": 4, "clip_similarity": 0.5, "TEXT": "not needed"}
    assert dedup_key(row) == {**{k: row[k] for k in ("uid", "image_sha256", "pdq_hash", "pdq_quality", "stored_width", "stored_height",
                                                     "clip_similarity")}, "clip_image_embedding": b"\0\0"}


# -- `kiln prepare --dedup` end to end -------------------------------------------------------------

IMAGE_SIZE = 256
FLAGS = ("--quiet", "--image-size", str(IMAGE_SIZE), "--download-timeout", "3", "--samples-per-shard", "30",
         "--toxicity", "off", "--nsfw", "off", "--t5", "off")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("dweb")
    w = synthesize(root / "web", rows=90, seed=3, failure_rate=0.05, size_range=(200, 400), dupes_per_kind=2)
    overlap = write_eval_folder(w, root / "eval", overlap=3, others=2)
    with SynthServer(w) as server:
        yield w, server, root / "eval", overlap


def _prepare(web, out, *flags, models=None, beam_argv=()):
    w, server, _, _ = web
    from pipeline.testbed.models import prepare_flags

    extra = prepare_flags(models) if models else []
    return run(prepare_config(str(w.metadata_path), str(out), server.allow_hosts, *FLAGS, *extra, *flags), list(beam_argv))


def _rows(out: Path, sub: str) -> list[dict]:
    return [r for p in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def pdq_run(web, tmp_path_factory):
    out = tmp_path_factory.mktemp("dds") / "pdq"
    _prepare(web, out, "--clip", "off", "--dedup", "exact,pdq", "--dedup-pdq-radius", "31", "--decontaminate", str(web[2]))
    return out


def _stored_area(t):
    side = min(t["true_width"], t["true_height"], IMAGE_SIZE)  # center crop, never upscaled
    return side * side


@pytest.mark.slow
def test_prepare_removes_exactly_the_planted_exact_and_near_copies_and_the_eval_overlap(web, pdq_run):
    w, _, _, overlap = web
    truths = {t["uid"]: t for t in pq.read_table(w.ground_truth_path).to_pylist()}
    want = {uid: ("eval_overlap", name) for name, uid in overlap.items() if uid}
    for d in w.duplicates:
        if d["how"] in ("cropped", "rescene"):
            continue  # different pixels: neither sha256 nor PDQ (distances > 70 on this web) may join them
        a, b = truths[d["uid"]], truths[d["of_uid"]]
        # The keep rule: larger stored area, then (clip off: null) the smaller uid.
        keep, drop = sorted((a, b), key=lambda t: (-_stored_area(t), t["uid"]))
        want[drop["uid"]] = ("duplicate_exact" if d["how"] == "exact_copy" else "duplicate_pdq", keep["uid"])
    rejects = [r for r in _rows(pdq_run, "rejects") if r["stage"] == "dedup"]
    assert {r["uid"]: (r["reason"], r["duplicate_of"]) for r in rejects} == want
    kept = {r["uid"] for r in _rows(pdq_run, "meta")}
    assert all(r["duplicate_of"] in kept for r in rejects if r["reason"] != "eval_overlap")
    semantic_only = [d for d in w.duplicates if d["how"] in ("cropped", "rescene")]
    assert all(d["uid"] in kept and d["of_uid"] in kept for d in semantic_only)
    assert {d["how"] for d in w.duplicates} == set(DUPE_KINDS)


@pytest.mark.slow
def test_prepare_resume_gives_the_same_decisions(web, pdq_run, tmp_path):
    rejects = [r for r in _rows(pdq_run, "rejects") if r["stage"] == "dedup" and r["reason"] != "eval_overlap"]
    shard_of = {r["uid"]: s for s, p in enumerate(sorted((pdq_run / "meta").glob("*.parquet"))) for r in pq.read_table(p).to_pylist()}
    # Redo a shard holding a removed sample whose kept twin sits in another shard (kept on disk).
    cross = [r for r in rejects if shard_of[r["duplicate_of"]] != r["shard"]]
    assert cross, "the web must plant a duplicate across shards"
    redo = f"{cross[0]['shard']:06d}"
    partial = tmp_path / "partial"
    shutil.copytree(pdq_run, partial)
    for name in ("_SUCCESS", "manifest.json", "stats.json", f"meta/{redo}.parquet", f"shards/{redo}.tar", f"rejects/{redo}.parquet"):
        (partial / name).unlink()
    stats = _prepare(web, partial, "--clip", "off", "--dedup", "exact,pdq", "--dedup-pdq-radius", "31", "--decontaminate", str(web[2]))
    assert stats["this_run"]["shards_skipped"] == stats["num_shards"] - 1
    for sub in ("meta", "rejects", "shards"):
        for p in sorted((pdq_run / sub).iterdir()):
            assert (partial / sub / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.slow
def test_prepare_dedup_is_the_same_on_the_multiprocess_runner(web, pdq_run, tmp_path):
    out = tmp_path / "multi"
    _prepare(web, out, "--clip", "off", "--dedup", "exact,pdq", "--dedup-pdq-radius", "31", "--decontaminate", str(web[2]),
             beam_argv=["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    for sub in ("meta", "rejects", "shards"):
        names = sorted(p.name for p in (pdq_run / sub).iterdir())
        assert names == sorted(p.name for p in (out / sub).iterdir())
        for name in names:
            assert (out / sub / name).read_bytes() == (pdq_run / sub / name).read_bytes(), name


@pytest.mark.slow
def test_prepare_semantic_dedup_equals_the_reference_on_the_stored_embeddings(web, tmp_path):
    from pipeline.testbed.models import cached_test_models

    models = cached_test_models()
    w = web[0]
    scored = tmp_path / "scored"
    _prepare(web, scored, "--clip", "score", models=models)
    meta = _rows(scored, "meta")
    rules = DedupRules(exact=True, pdq_radius=15, semantic_cosine=0.95)
    want = {d["uid"]: (d["reason"], d["duplicate_of"]) for d in dedup_in_memory([dedup_key(r) for r in meta], rules)}
    out = tmp_path / "dedup"
    _prepare(web, out, "--clip", "score", "--dedup", "exact,pdq,semantic", "--dedup-pdq-radius", "15", "--dedup-cosine", "0.95",
             models=models)
    got = {r["uid"]: (r["reason"], r["duplicate_of"]) for r in _rows(out, "rejects") if r["stage"] == "dedup"}
    assert got == want
    # The re-rendered scenes (other pixels, other caption) are what only the semantic rule can catch:
    # each planted pair whose stored embeddings are within the cosine is removed as duplicate_semantic.
    emb = {r["uid"]: np.frombuffer(r["clip_image_embedding"], "<f2").astype(np.float32) for r in meta}
    close = [d for d in w.duplicates if d["how"] == "rescene" and float(emb[d["uid"]] @ emb[d["of_uid"]]) >= 0.95]
    assert close, "no re-rendered scene within the cosine: the test would not test the semantic rule"
    for d in close:
        removed = d["uid"] if d["uid"] in got else d["of_uid"]
        assert got[removed][0] == "duplicate_semantic"


@pytest.mark.slow
def test_eval_images_are_embedded_with_the_datasets_clip_model(web, tmp_path):
    """--decontaminate-cosine: the evaluation images go through the dataset's CLIP model as the
    samples did, so an overlapped sample matches its evaluation image by cosine alone."""
    from pipeline.dedup import ClipEmbedder, build_eval_index
    from pipeline.prepare import resolve_models
    from pipeline.testbed.models import cached_test_models, prepare_flags

    models = cached_test_models()
    w, server, eval_dir, overlap = web
    out = tmp_path / "scored"
    _prepare(web, out, "--clip", "score", models=models)
    cfg, _, _ = resolve_models(prepare_config(str(w.metadata_path), str(out), server.allow_hosts, *FLAGS, *prepare_flags(models),
                                              "--clip", "score"))
    rules = DedupRules(eval_set=str(eval_dir), eval_pdq_radius=0, eval_cosine=0.97)
    index = build_eval_index(rules, ClipEmbedder(cfg.clip, cfg.models))
    meta = {r["uid"]: r for r in _rows(out, "meta")}
    for name, uid in overlap.items():
        if uid:
            key = {**dedup_key(meta[uid]), "pdq_hash": None}  # cosine only
            got = index.match(key)
            assert got is not None and got[0] == name and got[1].startswith("cosine"), (name, got)


# -- `kiln subset` dedup == `kiln prepare --dedup` on the same samples -----------------------------


@pytest.fixture(scope="module")
def scored_parent(web, tmp_path_factory):
    """A `kiln prepare` of the planted-duplicate web with the tiny CLIP scoring (nothing filtered,
    nothing deduplicated): the parent the subset tests derive children from."""
    from pipeline.testbed.models import cached_test_models

    out = tmp_path_factory.mktemp("dsub") / "parent"
    _prepare(web, out, "--clip", "score", models=cached_test_models())
    return out


def _subset(parent, out, *flags) -> None:
    from pipeline.cli import main as kiln

    assert kiln(["subset", str(parent), "--out", str(out), "--quiet", *map(str, flags)]) == 0


def _removed(out: Path, stage: str) -> dict:
    return {r["uid"]: (r["reason"], r["duplicate_of"]) for r in _rows(out, "rejects") if r["stage"] == stage}


SAME_RULES = {  # name: (kiln prepare flags, kiln subset flags)
    "exact": (("--dedup", "exact"), ("--dedup-exact",)),
    "pdq": (("--dedup", "pdq", "--dedup-pdq-radius", "15"), ("--dedup-pdq", "15")),
    "semantic": (("--dedup", "semantic", "--dedup-cosine", "0.95"), ("--dedup-semantic", "0.95")),
    "all+decontaminate": (("--dedup", "exact,pdq,semantic", "--dedup-pdq-radius", "31", "--dedup-cosine", "0.95", "--decontaminate", "EVAL"),
                          ("--dedup-exact", "--dedup-pdq", "31", "--dedup-semantic", "0.95", "--decontaminate", "EVAL")),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SAME_RULES))
def test_subset_dedup_removes_what_prepare_dedup_removes(web, scored_parent, tmp_path, name):
    """The same rules on the same samples: `kiln subset PARENT --dedup-*` (stage subset) removes the
    same uids, for the same reasons, in favour of the same kept samples, as `kiln prepare --dedup`
    (stage dedup) of the web the parent was made from."""
    from pipeline.testbed.models import cached_test_models

    prep_flags, sub_flags = ([str(web[2]) if f == "EVAL" else f for f in flags] for flags in SAME_RULES[name])
    prepared = tmp_path / "prepared"
    _prepare(web, prepared, "--clip", "score", *prep_flags, models=cached_test_models())
    child = tmp_path / "child"
    _subset(scored_parent, child, *sub_flags)
    want, got = _removed(prepared, "dedup"), _removed(child, "subset")
    assert want, f"{name}: prepare removed nothing on the planted web; the comparison would test nothing"
    assert got == want
    parent_kept = {r["uid"] for r in _rows(scored_parent, "meta")}
    assert {r["uid"] for r in _rows(child, "meta")} == parent_kept - set(got) == {r["uid"] for r in _rows(prepared, "meta")}


@pytest.mark.slow
def test_subset_decontaminate_cosine_embeds_eval_images_with_the_parents_clip(web, scored_parent, tmp_path):
    """`kiln subset --decontaminate-cosine`: the evaluation images go through the parent's CLIP model
    (stats.json models.clip), and the child removes exactly what the in-memory reference removes with
    that model -- including samples that only the cosine (not PDQ) ties to an evaluation image."""
    import json

    from pipeline.config import ClipConfig, ModelsConfig
    from pipeline.dedup import ClipEmbedder, build_eval_index, embedding_of

    eval_dir = str(web[2])
    stats = json.loads((scored_parent / "stats.json").read_text())
    loader = ClipEmbedder(ClipConfig(clip_mode="score", clip_model=stats["models"]["clip"]["spec"], nsfw_mode="off"), ModelsConfig())
    keys = [dedup_key(r) for r in _rows(scored_parent, "meta")]
    by_pdq = build_eval_index(DedupRules(eval_set=eval_dir))
    by_emb = build_eval_index(DedupRules(eval_set=eval_dir, eval_cosine=-1.0), loader)
    # A cosine just below the best match of a sample PDQ does not tie to the set: the cosine must catch it.
    sims = {k["uid"]: float(np.max(by_emb.emb @ embedding_of(k))) for k in keys if by_pdq.match(k) is None}
    cosine = float(np.floor((max(sims.values()) - 0.002) * 1000) / 1000)
    cosine_only = {u for u, s in sims.items() if s >= cosine}
    assert cosine_only
    rules = DedupRules(eval_set=eval_dir, eval_cosine=cosine)
    want = {d["uid"]: (d["reason"], d["duplicate_of"]) for d in dedup_in_memory(keys, rules, clip_loader=loader)}
    assert cosine_only <= set(want) and {v[0] for v in want.values()} == {"eval_overlap"}

    child = tmp_path / "child"
    _subset(scored_parent, child, "--decontaminate", eval_dir, "--decontaminate-cosine", cosine)
    assert _removed(child, "subset") == want
    details = {r["uid"]: r["detail"] for r in _rows(child, "rejects")}
    assert all(details[u].startswith("cosine") for u in cosine_only)
    [rule] = json.loads((child / "stats.json").read_text())["subset"]["rules"]
    assert rule["eval_cosine"] == cosine and rule["eval_clip_model"]["sha256"] == stats["models"]["clip"]["sha256"]
    # Without the cosine, only PDQ ties samples to the set: the cosine-only samples stay.
    pdq_child = tmp_path / "pdq"
    _subset(scored_parent, pdq_child, "--decontaminate", eval_dir)
    assert set(_removed(pdq_child, "subset")) == set(want) - cosine_only
