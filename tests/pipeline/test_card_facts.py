"""pipeline.card.facts: the histograms, the score table, and `collect` on a hand-written dataset
whose input columns have other names than LAION's (the run's --url-col / --caption-col)."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.accounting import AccountingError
from pipeline.card.facts import SCORES, FloatHist, IntHist, collect, domain_of, input_columns, sample_rank
from pipeline.records import FIELDS_BY_NAME, SCORE_FIELDS
from pipeline.write import META_KEY


def test_score_table_follows_the_records_score_fields():
    assert [s.column for s in SCORES] == list(SCORE_FIELDS)
    assert {s.column: s.stage for s in SCORES} == {"toxicity": "toxicity", "clip_similarity": "clip", "punsafe": "nsfw"}
    assert all(s.stage == FIELDS_BY_NAME[s.column].stage for s in SCORES)
    assert {s.column: (s.threshold_flag, s.rejects) for s in SCORES} == {
        "toxicity": ("max_toxicity", "above"), "clip_similarity": ("min_clip_similarity", "below"), "punsafe": ("max_punsafe", "above")}


def test_float_hist_quantiles_are_bin_upper_edges():
    h = FloatHist(0.0, 1.0, 10, ("kept",))
    h.add("kept", [0.05, 0.15, 0.15, 0.95, None, float("nan"), 1.5, -3])  # out of range: clipped into the end bins
    assert h.n("kept") == 6
    assert h.counts["kept"].tolist() == [2, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert h.quantile("kept", 0.5) == pytest.approx(0.2) and h.quantile("kept", 1.0) == pytest.approx(1.0)
    assert h.min["kept"] == -3 and h.max["kept"] == 1.5 and h.mean("kept") == pytest.approx((0.05 + 0.3 + 0.95 + 1.5 - 3) / 6)
    assert FloatHist(0, 1, 4, ("kept",)).quantile("kept", 0.5) is None


def test_int_hist_counts_exactly_up_to_its_cap():
    h = IntHist(10)
    h.add([1, 2, 2, 3, 50, None])
    assert (h.n, h.sum, h.max) == (5, 58, 50)
    assert h.quantile(0.5) == 2 and h.quantile(1.0) == 10  # 50 shares the last bin
    assert h.at_least(3) == 2 and h.at_least(100) == 1


def test_input_columns_come_from_the_flags_with_laion_defaults():
    assert input_columns({}) == {"url": "URL", "caption": "TEXT", "id": "SAMPLE_ID"}
    assert input_columns({"flags": {"url_col": "url", "caption_col": "caption", "id_col": "key", "max_bytes": 1000000}}) == {
        "url": "url", "caption": "caption", "id": "key"}
    assert domain_of("https://WWW.Example.com:8080/a.jpg") == "example.com" and domain_of(None) == "(no host)"
    assert domain_of("http://[::1") == "(no host)"


def _jpeg(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def _write(path, data: bytes) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


@pytest.fixture
def lowercase_dataset(tmp_path):
    """One shard: 4 kept samples with `url`/`caption` input columns, 3 rejects, and the stats.json
    and manifest.json a run would write."""
    kept = [
        # uid, url, caption, toxicity, clip, punsafe, width, height
        ("a" * 32, "http://www.a.example/1.jpg", "a red square", 0.01, 0.40, 0.02, 300, 200),
        ("b" * 32, "http://a.example/2.jpg", "blue", 0.02, 0.35, 0.50, 1024, 2048),  # punsafe > 0.1: not in the grid
        ("c" * 32, "http://b.example/3.jpg", "a green circle", 0.90, 0.50, 0.01, 64, 64),  # toxic caption: not in the grid
        ("d" * 32, "http://c.example/4.jpg", "yellow", 0.03, 0.30, 0.05, 100, 100),
    ]
    meta = pa.table({
        "url": [k[1] for k in kept], "caption": [k[2] for k in kept], "LICENSE": ["?", "?", "https://creativecommons.org/licenses/by/4.0/", None],
        "uid": [k[0] for k in kept], "original_width": [k[6] for k in kept], "original_height": [k[7] for k in kept],
        "stored_width": [64] * 4, "stored_height": [64] * 4, "source_format": ["jpeg", "png", "jpeg", "jpeg"],
        "image_bytes": [100, 200, 300, 400], "toxicity": [k[3] for k in kept], "clip_similarity": [k[4] for k in kept],
        "punsafe": [k[5] for k in kept], "t5_len": [4, 2, 5, 2], "t5_truncated": [False, False, True, False],
    })
    rejects = pa.table({"uid": ["e" * 32, "f" * 32, "0" * 32], "stage": ["prefilter", "clip", "nsfw"],
                        "reason": ["caption_empty", "clip_similarity_low", "punsafe_high"],
                        "toxicity": [None, 0.1, 0.2], "clip_similarity": [None, 0.1, 0.45], "punsafe": [None, None, 0.9]})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for uid, *_ in kept:
            data = _jpeg((200, 30, 30))
            info = tarfile.TarInfo(f"{uid}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = _write(tmp_path / "shards/000000.tar", buf.getvalue())
    rej = io.BytesIO()
    pq.write_table(rejects, rej)
    _write(tmp_path / "rejects/000000.parquet", rej.getvalue())
    footer = {"shard": 0, "num_shards": 1}
    (tmp_path / "meta").mkdir()
    pq.write_table(meta.replace_schema_metadata({META_KEY: json.dumps(footer).encode()}), tmp_path / "meta/000000.parquet")
    funnel = [
        {"stage": "prefilter", "mode": "filter", "in": 7, "out": 6, "rejected": 1, "reasons": {"caption_empty": 1}},
        {"stage": "toxicity", "mode": "score", "in": 6, "out": 6, "rejected": 0, "reasons": {}},
        {"stage": "download", "mode": "filter", "in": 6, "out": 6, "rejected": 0, "reasons": {}},
        {"stage": "decode", "mode": "filter", "in": 6, "out": 6, "rejected": 0, "reasons": {}},
        {"stage": "resize", "mode": "filter", "in": 6, "out": 6, "rejected": 0, "reasons": {}},
        {"stage": "clip", "mode": "filter", "in": 6, "out": 5, "rejected": 1, "reasons": {"clip_similarity_low": 1}},
        {"stage": "nsfw", "mode": "filter", "in": 5, "out": 4, "rejected": 1, "reasons": {"punsafe_high": 1}},
    ]
    stats = {"input": {"rows": 7}, "kept": 4, "rejected": 3, "num_shards": 1, "accounting": {"ok": True}, "funnel": funnel,
             "stage_modes": {"prefilter": "filter", "toxicity": "score", "download": "filter", "decode": "filter",
                             "resize": "filter", "clip": "filter", "nsfw": "filter", "t5": "off"},
             "flags": {"url_col": "url", "caption_col": "caption", "id_col": "key", "max_bytes": 1000000}}
    manifest = {"num_shards": 1, "samples": 4, "shards": [{"shard": "000000", "tar": "shards/000000.tar", "samples": 4, "bytes": tar_bytes,
                                                           "meta": "meta/000000.parquet", "rejects": "rejects/000000.parquet", "rejected": 3}]}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_collect_reads_the_columns_the_flags_name(lowercase_dataset):
    facts = collect(str(lowercase_dataset), seed=3, n_samples=16)
    assert (facts.kept, facts.rejected, facts.input_rows) == (4, 3, 7)
    assert facts.columns == {"url": "url", "caption": "caption", "id": "key"}
    assert facts.funnel == json.loads((lowercase_dataset / "stats.json").read_text())["funnel"]
    assert facts.reasons == {"prefilter": {"caption_empty": 1}, "clip": {"clip_similarity_low": 1}, "nsfw": {"punsafe_high": 1}}
    assert facts.domains == {"a.example": 2, "b.example": 1, "c.example": 1}
    assert facts.caption_chars.n == 4 and facts.caption_chars.max == len("a green circle")
    assert facts.licences == {"?": 2, "https://creativecommons.org/licenses/by/4.0/": 1, "(null)": 1} and facts.has_license_column
    assert facts.formats == {"jpeg": 3, "png": 1} and facts.image_bytes == 1000 and facts.t5_truncated == 1
    assert facts.shorter_side.counts[[200, 1024, 64, 100]].tolist() == [1, 1, 1, 1] and facts.wh.sum() == 4
    assert facts.bytes_by_kind["shards"] == (lowercase_dataset / "shards/000000.tar").stat().st_size
    # Scores: kept rows, rows the score's own stage rejected, and rows rejected elsewhere that carried it.
    clip = facts.scores["clip_similarity"]
    assert (clip.n("kept"), clip.n("rejected_here"), clip.n("rejected_elsewhere")) == (4, 1, 1)
    assert facts.scores["punsafe"].n("rejected_here") == 1 and facts.scores["punsafe"].n("rejected_elsewhere") == 0
    assert facts.score_non_null == {"toxicity": 6, "clip_similarity": 6, "punsafe": 5}
    # The grid: screened samples only (punsafe <= 0.1, toxicity <= 0.5), in seeded rank order.
    assert facts.samples_screened
    assert [e[1] for e in facts.samples] == sorted(["a" * 32, "d" * 32], key=lambda u: sample_rank(3, u))
    assert facts.samples[0][2] == "shards/000000.tar" and {e[3] for e in facts.samples} == {"a red square", "yellow"}
    assert [e[1] for e in collect(str(lowercase_dataset), seed=3, n_samples=1).samples] == [facts.samples[0][1]]


def test_collect_shows_no_unscreened_samples_unless_asked(lowercase_dataset):
    meta_path = lowercase_dataset / "meta/000000.parquet"
    table = pq.read_table(meta_path)
    table = table.set_column(table.column_names.index("punsafe"), "punsafe", pa.array([None] * 4, pa.float64()))
    pq.write_table(table, meta_path)
    facts = collect(str(lowercase_dataset))
    assert not facts.samples_screened and facts.samples == []
    assert [e[1] for e in collect(str(lowercase_dataset), unscreened_samples=True).samples] != []


def test_collect_refuses_files_that_disagree(lowercase_dataset):
    stats = json.loads((lowercase_dataset / "stats.json").read_text())
    (lowercase_dataset / "stats.json").write_text(json.dumps({**stats, "rejected": 2}))
    with pytest.raises(AccountingError, match="stats.json: rejected 2, rejects parquet files hold 3 rows"):
        collect(str(lowercase_dataset))
    (lowercase_dataset / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest.json: missing \(the shard manifest\)"):
        collect(str(lowercase_dataset))


def test_build_card_turns_disagreements_into_card_errors(lowercase_dataset):
    from pipeline.card import CardError, build_card

    text, pngs, meta = build_card(str(lowercase_dataset))
    assert "### Top source domains (host of url, kept rows)" in text and "| a.example | 2 | 50.00% |" in text
    assert set(pngs) == {"card_plots/clip_similarity.png", "card_plots/punsafe.png", "card_plots/toxicity.png",
                         "card_plots/image_sizes.png", "card_plots/caption_chars.png", "card_plots/samples.png"}
    assert "rebuilt from the flags in stats.json" in text  # this stats.json has no "command"
    assert np.frombuffer(pngs["card_plots/samples.png"][:8], np.uint8).tolist() == list(b"\x89PNG\r\n\x1a\n")
    (lowercase_dataset / "rejects/000000.parquet").unlink()
    with pytest.raises(CardError, match=r"no card written:\n  all shards complete: rejects/000000.parquet: listed in manifest.json but missing on disk"):
        build_card(str(lowercase_dataset))
    (lowercase_dataset / "stats.json").unlink()
    with pytest.raises(CardError, match=r"stats.json: missing \(the run's stats\); is this a finished `kiln prepare` output\?"):
        build_card(str(lowercase_dataset))
