"""`kiln prepare` with the model filters on, using the tiny local models (no downloads).

The synthetic web plants mismatched captions (another scene's caption) and toxic captions
(held-out toxic phrases the tiny Detoxify model never saw in training); the filters must catch
them while keeping true pairs, and every score must reach the shards and the rejects table.

What a tiny model decides on one borderline caption is not asserted anywhere here (it differs
between machines: PITFALLS.md). Instead:
  - the planted non-model failures are checked exactly in a run whose model stages only score;
  - the filtered run's outcome of every row is derived from that run's scores and the thresholds
    (so a filter that rejects the wrong rows, or a planted failure that ends elsewhere, fails);
  - the models' quality is asserted as rates, with tolerances measured on this data.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.testbed import prepare_config
from pipeline.prepare import run
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import FILTER_KINDS, synthesize
from pipeline.testbed.models import cached_test_models, prepare_flags

pytestmark = pytest.mark.slow
MULTI = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


@pytest.fixture(scope="module")
def models():
    return cached_test_models()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("fweb")
    w = synthesize(root, rows=400, seed=11, failure_rate=0.1, mismatch_rate=0.12, toxic_rate=0.06)
    with SynthServer(w) as server:
        yield w, server


def prepare(web_server, models, out: Path, *flags, beam=()):
    w, server = web_server
    args = prepare_config(str(w.metadata_path), str(out), server.allow_hosts, "--quiet", "--image-size", "256",
                        "--download-timeout", "3", "--samples-per-shard", "100", *prepare_flags(models), *flags)
    return run(args, list(beam))


def rows(out: Path, sub: str) -> list[dict]:
    return [r for p in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def filtered(web, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("fds") / "filtered"
    return out, prepare(web, models, out, "--t5-store", "both")  # both copies: the tests compare them


@pytest.fixture(scope="module")
def scored(web, models, tmp_path_factory):
    """The same job with every model stage scoring only (and the multi-process runner)."""
    out = tmp_path_factory.mktemp("fds") / "scored"
    return out, prepare(web, models, out, "--toxicity", "score", "--clip", "score", "--nsfw", "score", beam=MULTI)


def outcome(out: Path) -> dict:
    kept = {r["SAMPLE_ID"]: None for r in rows(out, "meta")}
    kept.update({r["SAMPLE_ID"]: (r["stage"], r["reason"]) for r in rows(out, "rejects")})
    return kept


def scores(out: Path) -> dict:
    """SAMPLE_ID -> the scores its row carries (kept or rejected)."""
    return {r["SAMPLE_ID"]: {k: r.get(k) for k in ("toxicity", "clip_similarity", "punsafe")}
            for sub in ("meta", "rejects") for r in rows(out, sub)}


MODEL_REJECTS = {("toxicity", "toxic"), ("clip", "clip_similarity_low"), ("nsfw", "punsafe_high")}
NEAR = 1e-3  # a score this close to its threshold may round either way between two runs: not judged

# Tolerances, measured: on this web (seed 11) and three others like it, 6 tiny Detoxify builds
# (seeds 0-5) caught 23-24 of 24 toxic captions and flagged 0 of 362 other captions; 3 tiny CLIP
# builds (seeds 0-2) rejected 48 of 48 mismatched captions and kept 98.3-99.7% of true pairs.
MIN_TOXIC_CAUGHT, MIN_MISMATCH_CAUGHT, MIN_TRUE_KEPT = 0.9, 0.9, 0.95
MAX_PLANTED_PREEMPTED = 0.1  # planted non-model failures a model stage rejects first


def test_planted_failures_end_where_the_ground_truth_says_when_the_models_only_score(web, scored):
    w, _ = web
    out, stats = scored
    truth = pq.read_table(w.ground_truth_path).to_pylist()
    got = outcome(out)
    assert len(got) == len(truth) and stats["accounting"]["ok"]
    wrong = []
    for t in truth:
        want = None if t["kind"] in FILTER_KINDS else (t["expected_stage"], t["expected_reason"])
        if want == (None, None):
            want = None
        if got[t["SAMPLE_ID"]] != want:
            wrong.append((t["kind"], want, got[t["SAMPLE_ID"]]))
    assert wrong == []
    planted = {t["kind"] for t in truth} - {"ok", *FILTER_KINDS}
    assert {"decompression_bomb", "http_404", "stall", "robots_noai", "duplicate", "too_small"} <= planted


def test_filtered_outcomes_follow_from_the_scores_and_thresholds(web, filtered, scored):
    """Every row of the filtered run ends where the score-only run's scores and the thresholds put it."""
    out, stats = filtered
    flags = stats["flags"]
    thr_tox, thr_clip, thr_nsfw = flags["max_toxicity"], flags["min_clip_similarity"], flags["max_punsafe"]
    got, base, score = outcome(out), outcome(scored[0]), scores(scored[0])
    judged, wrong = 0, []
    for sid, before in base.items():
        s = score[sid]
        near = [v for v, t in ((s["toxicity"], thr_tox), (s["clip_similarity"], thr_clip), (s["punsafe"], thr_nsfw))
                if v is not None and abs(v - t) < NEAR]
        if near:
            continue
        judged += 1
        if before is not None and before[0] == "prefilter":
            want = {before}
        elif s["toxicity"] is not None and s["toxicity"] > thr_tox:
            want = {("toxicity", "toxic")}
        elif before is not None:
            want = {before}  # consent, download, decode: the image stages' own rejects
        else:
            want = set()
            if s["clip_similarity"] < thr_clip:
                want.add(("clip", "clip_similarity_low"))
            elif s["punsafe"] > thr_nsfw:
                want.add(("nsfw", "punsafe_high"))
            want = want or {None}
        if got[sid] not in want:
            wrong.append((sid, before, s, got[sid]))
    assert judged >= 0.95 * len(base)
    assert wrong == []


def test_filters_catch_planted_mismatches_and_toxic_captions_and_keep_true_pairs(web, filtered):
    w, _ = web
    out, stats = filtered
    truth = pq.read_table(w.ground_truth_path).to_pylist()
    got = outcome(out)
    mismatched = [t for t in truth if t["kind"] == "mismatched_caption"]
    toxic = [t for t in truth if t["kind"] == "toxic_caption"]
    true_pairs = [t for t in truth if t["expected_stage"] is None]  # everything else that should survive
    planted = [t for t in truth if t["kind"] not in ("ok", *FILTER_KINDS) and t["expected_stage"] != "prefilter"]
    assert len(mismatched) >= 40 and len(toxic) >= 20 and len(true_pairs) >= 200 and len(planted) >= 20
    # A mismatched caption the toxicity model rejected first never reached CLIP.
    reached_clip = [t for t in mismatched if got[t["SAMPLE_ID"]] != ("toxicity", "toxic")]
    mis_rejected = np.mean([got[t["SAMPLE_ID"]] == ("clip", "clip_similarity_low") for t in reached_clip])
    tox_rejected = np.mean([got[t["SAMPLE_ID"]] == ("toxicity", "toxic") for t in toxic])
    true_kept = np.mean([got[t["SAMPLE_ID"]] is None for t in true_pairs])
    # Planted failures (a 404, a bomb, ...) still end where the ground truth says, or at a model
    # stage that ran first (whether that was right is the previous test's business).
    preempted = 0
    for t in planted:
        want = None if t["expected_stage"] is None else (t["expected_stage"], t["expected_reason"])
        if got[t["SAMPLE_ID"]] != want:
            assert got[t["SAMPLE_ID"]] in MODEL_REJECTS, (t["kind"], want, got[t["SAMPLE_ID"]])
            preempted += 1
    print(f"\nmismatched captions rejected by CLIP: {mis_rejected:.1%} of {len(reached_clip)}; "
          f"toxic captions rejected: {tox_rejected:.1%} of {len(toxic)}; true pairs kept: {true_kept:.1%} of {len(true_pairs)}; "
          f"planted failures a model stage rejected first: {preempted} of {len(planted)}")
    assert len(reached_clip) >= 0.9 * len(mismatched)
    assert mis_rejected >= MIN_MISMATCH_CAUGHT
    assert tox_rejected >= MIN_TOXIC_CAUGHT
    assert true_kept >= MIN_TRUE_KEPT
    assert preempted <= MAX_PLANTED_PREEMPTED * len(planted)
    assert stats["accounting"]["ok"]


def test_scores_reach_kept_rows_json_and_rejects(filtered):
    out, stats = filtered
    meta = rows(out, "meta")
    assert all(r["toxicity"] is not None and r["clip_similarity"] is not None and r["punsafe"] is not None for r in meta)
    assert all(0 <= r["punsafe"] <= 1 and 0 <= r["toxicity"] <= 1 and -1 <= r["clip_similarity"] <= 1 for r in meta)
    thr = stats["flags"]["min_clip_similarity"]
    assert all(r["clip_similarity"] >= thr for r in meta)
    dim = len(np.frombuffer(meta[0]["clip_image_embedding"], "<f2"))
    emb = np.stack([np.frombuffer(r["clip_image_embedding"], "<f2").astype(np.float32) for r in meta])
    assert emb.shape == (len(meta), dim)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-2)
    rej = rows(out, "rejects")
    clip_rej = [r for r in rej if r["stage"] == "clip"]
    tox_rej = [r for r in rej if r["stage"] == "toxicity"]
    assert clip_rej and all(r["clip_similarity"] < thr and r["toxicity"] is not None for r in clip_rej)
    assert tox_rej and all(r["toxicity"] > 0.5 and r["clip_similarity"] is None for r in tox_rej)
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(out / "shards" / "000000.tar"), shardshuffle=False)))
    js = json.loads(sample["json"])
    assert {"toxicity", "toxicity_scores", "clip_similarity", "punsafe"} <= set(js)
    assert "clip_image_embedding" not in js


def test_models_recorded_with_sha256(filtered, models):
    _, stats = filtered
    recorded = stats["models"]
    assert set(recorded) == {"toxicity", "clip", "nsfw", "t5"}
    nsfw_sha = hashlib.sha256(Path(models["nsfw"]).read_bytes()).hexdigest()
    assert recorded["nsfw"]["sha256"] == nsfw_sha
    clip_file = Path(models["clip"]) / "open_clip_model.safetensors"
    assert recorded["clip"]["sha256"] == hashlib.sha256(clip_file.read_bytes()).hexdigest()
    assert all(len(m["sha256"]) == 64 for m in recorded.values())


def test_score_only_mode_rejects_nothing_but_records_scores(filtered, scored):
    out, _ = filtered
    score_out, stats = scored
    assert stats["accounting"]["ok"]
    rej = rows(score_out, "rejects")
    assert not [r for r in rej if r["stage"] in ("toxicity", "clip", "nsfw")]
    meta = rows(score_out, "meta")
    assert all(r["clip_similarity"] is not None and r["toxicity"] is not None for r in meta)
    # Scores do not depend on the runner mode or on what else was in the batch.
    filtered_scores = {r["uid"]: r["clip_similarity"] for r in rows(out, "meta")}
    both = [r for r in meta if r["uid"] in filtered_scores]
    assert both and max(abs(r["clip_similarity"] - filtered_scores[r["uid"]]) for r in both) < 1e-4


def test_nsfw_threshold_rejects_exactly_the_high_punsafe(web, models, filtered, tmp_path):
    out, _ = filtered
    punsafe = sorted(r["punsafe"] for r in rows(out, "meta"))
    cut = punsafe[len(punsafe) // 2]
    prepare(web, models, tmp_path / "nsfw", "--max-punsafe", str(cut))
    rej = [r for r in rows(tmp_path / "nsfw", "rejects") if r["stage"] == "nsfw"]
    meta = rows(tmp_path / "nsfw", "meta")
    assert rej and all(r["punsafe"] > cut and r["reason"] == "punsafe_high" for r in rej)
    assert all(r["punsafe"] <= cut for r in meta)


def test_mismatched_nsfw_head_fails_before_the_job(web, models, tmp_path):
    from pipeline.testbed.models.clip import build_nsfw_head

    wrong = build_nsfw_head(tmp_path / "wrong", input_dim=768, seed=0)
    with pytest.raises(ValueError, match="768"):
        prepare(web, models, tmp_path / "x", "--nsfw-head", str(wrong))


def test_t5_embeddings_in_tar_and_parquet_agree_and_match_the_encoder(filtered, models):
    import io
    import tarfile

    from embed.t5 import T5Embedder

    out, stats = filtered
    meta = {r["uid"]: r for r in rows(out, "meta")}
    d_model = json.loads((Path(models["t5"]) / "config.json").read_text())["d_model"]
    with tarfile.open(out / "shards" / "000000.tar") as tar:
        npys = {m.name[: -len(".t5.npy")]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".t5.npy")}
    assert npys
    for uid, blob in npys.items():
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
        row = meta[uid]
        assert arr.dtype == np.float16 and arr.shape == (row["t5_len"], d_model)
        assert np.array_equal(arr, np.frombuffer(row["t5"], "<f2").reshape(-1, d_model))
    # The stored arrays are what the encoder gives for the caption alone (bucketing changes nothing).
    enc = T5Embedder(f"local:{models['t5']}", device="cpu")
    some = list(npys)[:8]
    ref = enc.embed([meta[u]["TEXT"] for u in some])
    for uid, r in zip(some, ref):
        assert np.allclose(np.load(io.BytesIO(npys[uid])).astype(np.float32), r.array.astype(np.float32), atol=2e-3)
        assert meta[uid]["t5_truncated"] == r.truncated
    assert stats["models"]["t5"]["sha256"] and stats["models"]["t5"]["max_length"] == 128


def test_t5_shared_across_processes_gives_the_same_embeddings(web, models, filtered, tmp_path):
    out, _ = filtered
    stats = prepare(web, models, tmp_path / "xproc", "--t5-cross-process", "--t5-store", "meta", beam=MULTI)
    assert stats["accounting"]["ok"]
    ref = {r["uid"]: r["t5"] for r in rows(out, "meta")}
    got = {r["uid"]: r["t5"] for r in rows(tmp_path / "xproc", "meta")}
    assert got.keys() == ref.keys()
    # Another process and other batch mates may round the last float16 bit differently.
    f16 = lambda b: np.frombuffer(b, "<f2").astype(np.float32)  # noqa: E731
    assert all(np.allclose(f16(got[u]), f16(ref[u]), atol=2e-3) for u in ref)
