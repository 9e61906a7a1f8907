"""`kiln prepare --t5-store / --t5-dtype` end to end: the shards a whole prepare writes load in the
trainer's reader (train.data), with the T5 values where SHARDS.md says and the dtype recorded.

The default (--t5-store tar, --t5-dtype float16) is what every other prepare test and the training
tests' synth_dataset use; here the two other stores, with the two other dtypes. Every store x dtype
pair is covered at the writer level in test_write.py."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.prepare import run
from pipeline.testbed import prepare_config
from pipeline.testbed.models import cached_test_models
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import synthesize
from train.data import ImageSpec, SkipCounts, check_dataset, load_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    models = cached_test_models()
    root = tmp_path_factory.mktemp("t5store")
    web = synthesize(root / "web", rows=40, seed=5, failure_rate=0.0, size_range=(80, 120), formats=("png",))
    out = {}
    with SynthServer(web) as server:
        for store, dtype in (("meta", "float8"), ("both", "bfloat16")):
            cfg = prepare_config(str(web.metadata_path), str(root / f"{store}-{dtype}"), server.allow_hosts, "--quiet",
                                 "--image-size", "64", "--toxicity", "off", "--clip", "off", "--nsfw", "off",
                                 "--t5-model", f"local:{models['t5']}", "--t5-store", store, "--t5-dtype", dtype)
            stats = run(cfg, [])
            assert stats["accounting"]["ok"]
            out[store, dtype] = (root / f"{store}-{dtype}", stats)
    d_model = json.loads((Path(models["t5"]) / "config.json").read_text())["d_model"]
    return out, d_model


def _texts(data: Path, d_model: int) -> dict:
    spec = ImageSpec(resolution=8, text_max_len=4, d_model=d_model)
    check_dataset(data, spec)
    counts = SkipCounts()
    records = load_records(data, spec, counts=counts)
    assert counts.kept == len(records) > 0 and counts.corrupt == 0 and counts.no_text == 0, counts
    return {r.key: r.text for r in records}


def test_meta_store_float8_and_both_store_bfloat16_load_in_the_trainer(datasets):
    out, d_model = datasets
    (meta8, stats8), (both16, stats16) = out["meta", "float8"], out["both", "bfloat16"]
    assert stats8["models"]["t5"]["store"] == "meta" and stats8["models"]["t5"]["stored_dtype"] == "float8_e4m3fn"
    assert stats8["flags"]["t5_store"] == "meta" and stats8["flags"]["t5_dtype"] == "float8"
    assert stats16["models"]["t5"]["stored_dtype"] == "bfloat16"
    for data, expect in ((meta8, set()), (both16, {"t5.bf16"})):
        exts = set()
        for tar_path in sorted((data / "shards").glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                exts |= {m.name.split(".", 1)[1] for m in tar.getmembers() if ".t5." in m.name}
        assert exts == expect
    rows8 = {r["uid"]: r for p in sorted((meta8 / "meta").glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    assert all(r["t5_dtype"] == "float8_e4m3fn" and r["t5"] is not None and len(r["t5"]) == r["t5_len"] * d_model for r in rows8.values())
    a8, a16 = _texts(meta8, d_model), _texts(both16, d_model)
    assert a8.keys() == a16.keys() == rows8.keys()
    for uid, x16 in a16.items():
        x8 = a8[uid]
        assert x8.shape == x16.shape == (rows8[uid]["t5_len"], d_model)
        peak = np.abs(x16).max()
        # float8 (3 mantissa bits) vs bfloat16 (7): within float8's half step of the larger value, plus
        # bfloat16's own rounding, relative to the sample's peak for the smallest values.
        assert np.all(np.abs(x8 - x16) <= 2**-4 * np.abs(x16) + 2**-8 * np.abs(x16) + peak * 2**-12)
