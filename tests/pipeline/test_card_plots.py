"""pipeline.card.plots: which plots a run gets, why the others are skipped, and reproducible PNGs."""

from pipeline.card.facts import SCORES, Facts, FloatHist, IntHist
from pipeline.card.plots import draw, plot_int_hist, plot_score

PNG = b"\x89PNG\r\n\x1a\n"


def _facts(modes: dict, kept: int = 0) -> Facts:
    facts = Facts("d", {"stage_modes": modes, "flags": {"min_clip_similarity": 0.3, "max_caption_chars": 50}}, {}, kept=kept)
    facts.scores = {s.column: FloatHist(s.lo, s.hi, s.bins, ("kept", "rejected_here", "rejected_elsewhere")) for s in SCORES}
    return facts


def test_a_run_with_nothing_kept_and_every_model_off_gets_reasons_not_plots():
    out = draw(_facts({"toxicity": "off", "clip": "off", "nsfw": "off", "t5": "off"}))
    assert all(png is None for png, _ in out.values())
    assert {k: why for k, (_, why) in out.items()} == {
        "toxicity": "the toxicity stage was off in this run, so the `toxicity` column is null",
        "clip_similarity": "the CLIP stage was off in this run, so the `clip_similarity` column is null",
        "punsafe": "the NSFW stage was off in this run, so the `punsafe` column is null",
        "image_sizes": "no kept samples", "caption_chars": "no kept samples",
        "t5_len": "the T5 stage was off in this run (`--t5 off`), so the `t5_len` column is null",
        "samples": "no kept samples eligible for the grid"}
    unscreened = draw(_facts({"nsfw": "off"}, kept=3))["samples"]
    assert unscreened == (None, "no sample grid: the NSFW stage was off, so no image was screened before being shown "
                                "here (`kiln card --unscreened-samples` draws one anyway)")


def test_a_scored_column_is_plotted_with_its_threshold():
    facts = _facts({"clip": "score"})
    facts.scores["clip_similarity"].add("kept", [0.2, 0.25, 0.4])
    facts.score_non_null["clip_similarity"] = 3
    facts.caption_chars.add([5, 12, 40])
    out = draw(facts)
    assert out["clip_similarity"][0][:8] == PNG and out["caption_chars"][0][:8] == PNG
    assert out["toxicity"] == (None, "the toxicity stage was off in this run, so the `toxicity` column is null")


def test_plots_are_byte_identical_for_the_same_data():
    h = FloatHist(-1.0, 1.0, 2000, ("kept", "rejected_here", "rejected_elsewhere"))
    h.add("kept", [0.3, 0.31, 0.5])
    h.add("rejected_here", [0.1])
    a = plot_score(h, "t", "x", 0.28, "--min-clip-similarity 0.28")
    assert a[:8] == PNG and a == plot_score(h, "t", "x", 0.28, "--min-clip-similarity 0.28")
    ih = IntHist(100)
    ih.add([3, 4, 4, 90])
    assert plot_int_hist(ih, "t", "x", [(50, "mark")]) == plot_int_hist(ih, "t", "x", [(50, "mark")])
