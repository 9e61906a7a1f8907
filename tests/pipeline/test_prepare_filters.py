"""`kiln prepare` with the model filters on, using the tiny local models (no downloads).

The synthetic web plants mismatched captions (another scene's caption) and toxic captions
(held-out toxic phrases the tiny Detoxify model never saw in training); the filters must catch
them while keeping true pairs, and every score must reach the shards and the rejects table.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.testbed.demo import prepare_args
from pipeline.prepare import run
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import synthesize
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
    args = prepare_args(str(w.metadata_path), str(out), server.allow_hosts, "--quiet", "--image-size", "256",
                        "--download-timeout", "3", "--samples-per-shard", "100", *prepare_flags(models), *flags)
    return run(args, list(beam))


def rows(out: Path, sub: str) -> list[dict]:
    return [r for p in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def filtered(web, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("fds") / "filtered"
    return out, prepare(web, models, out)


def outcome(out: Path) -> dict:
    kept = {r["SAMPLE_ID"]: None for r in rows(out, "meta")}
    kept.update({r["SAMPLE_ID"]: (r["stage"], r["reason"]) for r in rows(out, "rejects")})
    return kept


def test_filters_catch_planted_mismatches_and_toxic_captions_and_keep_true_pairs(web, filtered):
    w, _ = web
    out, stats = filtered
    truth = pq.read_table(w.ground_truth_path).to_pylist()
    got = outcome(out)
    mismatched = [t for t in truth if t["kind"] == "mismatched_caption"]
    toxic = [t for t in truth if t["kind"] == "toxic_caption"]
    true_pairs = [t for t in truth if t["expected_stage"] is None]  # everything else that should survive
    assert len(mismatched) >= 40 and len(toxic) >= 20 and len(true_pairs) >= 200
    mis_rejected = np.mean([got[t["SAMPLE_ID"]] == ("clip", "clip_similarity_low") for t in mismatched])
    tox_rejected = np.mean([got[t["SAMPLE_ID"]] == ("toxicity", "toxic") for t in toxic])
    true_kept = np.mean([got[t["SAMPLE_ID"]] is None for t in true_pairs])
    print(f"\nmismatched captions rejected by CLIP: {mis_rejected:.1%} of {len(mismatched)}; "
          f"toxic captions rejected: {tox_rejected:.1%} of {len(toxic)}; true pairs kept: {true_kept:.1%} of {len(true_pairs)}")
    assert mis_rejected >= 0.9
    assert tox_rejected >= 0.9
    assert true_kept >= 0.9
    # The non-model failures still end where the ground truth says.
    for t in truth:
        if t["kind"] not in ("mismatched_caption", "toxic_caption", "ok") and t["expected_stage"] is not None:
            assert got[t["SAMPLE_ID"]] == (t["expected_stage"], t["expected_reason"]), t["kind"]
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


def test_score_only_mode_rejects_nothing_but_records_scores(web, models, filtered, tmp_path):
    out, _ = filtered
    stats = prepare(web, models, tmp_path / "score", "--toxicity", "score", "--clip", "score", "--nsfw", "score", beam=MULTI)
    assert stats["accounting"]["ok"]
    rej = rows(tmp_path / "score", "rejects")
    assert not [r for r in rej if r["stage"] in ("toxicity", "clip", "nsfw")]
    meta = rows(tmp_path / "score", "meta")
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
    stats = prepare(web, models, tmp_path / "xproc", "--t5-cross-process", beam=MULTI)
    assert stats["accounting"]["ok"]
    ref = {r["uid"]: r["t5"] for r in rows(out, "meta")}
    got = {r["uid"]: r["t5"] for r in rows(tmp_path / "xproc", "meta")}
    assert got.keys() == ref.keys()
    # Another process and other batch mates may round the last float16 bit differently.
    f16 = lambda b: np.frombuffer(b, "<f2").astype(np.float32)  # noqa: E731
    assert all(np.allclose(f16(got[u]), f16(ref[u]), atol=2e-3) for u in ref)
