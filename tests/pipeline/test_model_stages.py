"""The model stages' Beam adapter: counters, score distributions, rejects, and model failures."""

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils import shared

from pipeline.config import InputConfig, ModelsConfig, ToxicityConfig
from pipeline.model_stages import _ModelStageFn, score_captions
from pipeline.records import STAGE_TOXICITY


class FakeToxicity:
    labels = ["toxicity", "insult"]

    def score(self, captions):
        class S:
            scores = np.array([[0.9 if "idiot" in c else 0.1, 0.2] for c in captions], np.float32)

        return S()


def _load(cfg, models):
    return FakeToxicity()


def _broken(model, batch, cfg, caption_col):
    raise RuntimeError("CUDA out of memory")


def run_stage(score_fn, records, kept, rejects):
    """Run the DoFn on one batch; `kept`/`rejects` are the expected (uid, stage, reason, has-score) rows."""
    p = beam.Pipeline()
    out = p | beam.Create([records]) | beam.ParDo(
        _ModelStageFn(_load, score_fn, ToxicityConfig(), ModelsConfig(), InputConfig(), (STAGE_TOXICITY,), shared.Shared(), "fake")
    ).with_outputs("rejects", main="main")
    assert_that(out.main | "Kept" >> beam.Map(lambda r: r["uid"]), equal_to(kept), label="CheckKept")
    assert_that(
        out.rejects | "Rej" >> beam.Map(lambda r: (r["uid"], r["stage"], r["reason"], r["toxicity"] is not None)),
        equal_to(rejects),
        label="CheckRejects",
    )
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace("kiln"))
    return {c.key.metric.name: c.committed for c in metrics["counters"]}, {
        d.key.metric.name: d.committed for d in metrics["distributions"]}


RECORDS = [{"uid": "a", "TEXT": "a red circle", "shard": 0}, {"uid": "b", "TEXT": "you idiot", "shard": 0}]


def test_score_captions_filters_and_records_scores():
    out = score_captions(FakeToxicity(), RECORDS, ToxicityConfig())
    assert [rej is None for _, rej in out] == [True, False]
    assert out[1][1].reason == "toxic" and "toxicity 0.9" in out[1][1].detail
    assert out[0][0]["toxicity_scores"] == {"toxicity": 0.1, "insult": 0.2}
    assert all(rej is None for _, rej in score_captions(FakeToxicity(), RECORDS, ToxicityConfig(mode="score")))
    # max over chosen labels only
    assert score_captions(FakeToxicity(), RECORDS, ToxicityConfig(labels=("insult",)))[1][1] is None


def test_counters_distributions_and_rejects_carry_scores():
    counters, dists = run_stage(score_captions, RECORDS, ["a"], [("b", "toxicity", "toxic", True)])
    assert counters["toxicity/in"] == 2 and counters["toxicity/out"] == 1 and counters["toxicity/rejected"] == 1
    assert counters["reject/toxicity/toxic"] == 1
    d = dists["score/toxicity_milli"]
    assert (d.count, d.min, d.max) == (2, 200, 900)  # max over all labels: 0.2 (insult) and 0.9


def test_a_batch_the_model_cannot_score_is_rejected_not_lost():
    counters, _ = run_stage(_broken, RECORDS, [], [("a", "toxicity", "toxicity_error", False), ("b", "toxicity", "toxicity_error", False)])
    assert counters["reject/toxicity/toxicity_error"] == 2
