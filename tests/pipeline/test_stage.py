"""pipeline/stage.py: the threaded Beam adapter every per-record stage uses, and its counters."""

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import InputConfig
from pipeline.records import Reject
from pipeline.stage import ThreadedStage

COLUMNS = InputConfig(url_col="url", id_col="key")


class _MakeFn:
    """make_fn for ThreadedStage: doubles `n`, rejects odd n, raises on n == 13 (a bug in a stage)."""

    def __call__(self):
        def fn(record):
            if record["n"] == 13:
                raise KeyError("boom")
            if record["n"] % 2:
                raise Reject("decode", "too_small", f"n={record['n']}")
            return {**record, "n2": record["n"] * 2}

        return fn


def test_threaded_stage_keeps_rejects_and_turns_a_crash_into_one_reject():
    records = [{"uid": f"{i:032x}", "key": i, "url": f"http://h.example.test/{i}.jpg", "shard": 0, "n": i} for i in range(20)]
    p = beam.Pipeline()
    out = p | beam.Create(records) | "Decode" >> ThreadedStage("decode", _MakeFn(), COLUMNS, threads=3, batch_size=4,
                                                              error_reason="decode_error")
    assert_that(out["main"] | "N2" >> beam.Map(lambda r: (r["key"], r["n2"])),
                equal_to([(i, 2 * i) for i in range(0, 20, 2)]), label="Kept")
    want = [(i, "decode", "too_small", f"n={i}") for i in range(1, 20, 2) if i != 13]
    want.append((13, "decode", "decode_error", "KeyError: 'boom'"))
    assert_that(out["rejects"] | "Rej" >> beam.Map(lambda r: (r["SAMPLE_ID"], r["stage"], r["reason"], r["detail"])),
                equal_to(want), label="Rejects")
    assert_that(out["rejects"] | "Urls" >> beam.Map(lambda r: (r["url"] == f"http://h.example.test/{r['SAMPLE_ID']}.jpg", r["shard"])),
                equal_to([(True, 0)] * 10), label="RejectColumns")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(MetricsFilter().with_namespace("kiln"))["counters"]}
    assert counters["decode/in"] == 20 and counters["decode/out"] == 10 and counters["decode/rejected"] == 10
    assert counters["reject/decode/too_small"] == 9 and counters["reject/decode/decode_error"] == 1
