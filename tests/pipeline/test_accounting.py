"""pipeline.accounting: the ledger from footers and from files, its funnel, and every way the check fails.

The datasets here are written by hand (two shards of parquet and tar files with the footers the
writer would give them), so each number asserted is known without running the pipeline.
"""

import io
import json
import re
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.accounting import AccountingError, Ledger, check
from pipeline.finalize import check_accounting, funnel_from, read_footers
from pipeline.write import META_KEY

MODES = {"prefilter": "filter", "toxicity": "off", "download": "filter", "decode": "filter", "resize": "filter",
         "clip": "filter", "nsfw": "off", "t5": "off"}
# Two shards: which samples each keeps and which (stage, reason) rows each rejects.
SHARDS = {
    0: {"kept": 4, "rejects": [("prefilter", "duplicate")] * 2 + [("prefilter", "caption_empty")] + [("download", "http_404")] * 3},
    1: {"kept": 5, "rejects": [("download", "timeout"), ("clip", "clip_similarity_low"), ("clip", "clip_similarity_low")]},
}
INPUT_ROWS = 18  # 9 kept + 9 rejected
EXPECTED_FUNNEL = [
    {"stage": "prefilter", "mode": "filter", "in": 18, "out": 15, "rejected": 3, "reasons": {"caption_empty": 1, "duplicate": 2}},
    {"stage": "download", "mode": "filter", "in": 15, "out": 11, "rejected": 4, "reasons": {"http_404": 3, "timeout": 1}},
    {"stage": "decode", "mode": "filter", "in": 11, "out": 11, "rejected": 0, "reasons": {}},
    {"stage": "resize", "mode": "filter", "in": 11, "out": 11, "rejected": 0, "reasons": {}},
    {"stage": "clip", "mode": "filter", "in": 11, "out": 9, "rejected": 2, "reasons": {"clip_similarity_low": 2}},
]


def _uid(shard: int, i: int, kind: str = "k") -> str:
    return f"{shard:x}{kind}{i:030d}"[:32]


def _tar_bytes(uids) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for uid in uids:
            for ext, data in (("jpg", b"\xff\xd8jpeg"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{uid}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_dataset(root, shards=SHARDS, num_shards=2, fingerprint="fp") -> dict[int, dict]:
    """shards/, rejects/ and meta/ as the writer lays them out; returns the footers it wrote."""
    for sub in ("shards", "rejects", "meta"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    footers = {}
    for shard, spec in shards.items():
        name = f"{shard:06d}"
        uids = [_uid(shard, i) for i in range(spec["kept"])]
        tar = _tar_bytes(uids)
        (root / "shards" / f"{name}.tar").write_bytes(tar)
        rejects = pa.table({"uid": [_uid(shard, i, "r") for i in range(len(spec["rejects"]))],
                            "stage": [s for s, _ in spec["rejects"]], "reason": [r for _, r in spec["rejects"]]})
        rej = _parquet_bytes(rejects)
        (root / "rejects" / f"{name}.parquet").write_bytes(rej)
        by_reason: dict = {}
        for stage, reason in spec["rejects"]:
            by_reason.setdefault(stage, {}).setdefault(reason, 0)
            by_reason[stage][reason] += 1
        later = sum(1 for stage, _ in spec["rejects"] if stage != "prefilter")
        footer = {"shard": shard, "num_shards": num_shards, "config_fingerprint": fingerprint, "samples": spec["kept"],
                  "candidates": spec["kept"] + later, "rejects": len(spec["rejects"]), "rejects_by_reason": by_reason,
                  "tar": {"path": f"shards/{name}.tar", "bytes": len(tar), "sha256": "-"},
                  "rejects_file": {"path": f"rejects/{name}.parquet", "bytes": len(rej), "sha256": "-"}}
        meta = pa.table({"uid": uids}).replace_schema_metadata({META_KEY: json.dumps(footer).encode()})
        pq.write_table(meta, root / "meta" / f"{name}.parquet")
        footers[shard] = footer
    return footers


@pytest.fixture
def dataset(tmp_path):
    footers = write_dataset(tmp_path)
    return tmp_path, footers


def test_ledger_and_funnel_from_hand_made_footers():
    footers = {
        0: {"shard": 0, "num_shards": 2, "config_fingerprint": "fp", "samples": 4, "candidates": 7, "rejects": 6,
            "rejects_by_reason": {"prefilter": {"duplicate": 2, "caption_empty": 1}, "download": {"http_404": 3}},
            "tar": {"bytes": 100}, "rejects_file": {"bytes": 50}},
        1: {"shard": 1, "num_shards": 2, "config_fingerprint": "fp", "samples": 5, "candidates": 8, "rejects": 3,
            "rejects_by_reason": {"download": {"timeout": 1}, "clip": {"clip_similarity_low": 2}},
            "tar": {"bytes": 120}, "rejects_file": {"bytes": 40}},
    }
    ledger = Ledger.from_footers(INPUT_ROWS, footers)
    assert (ledger.kept, ledger.rejected, ledger.input_rows) == (9, 9, 18)
    assert ledger.num_shards == {2} and ledger.fingerprints == {"fp"}
    assert ledger.shards[0].later_rejects == 3 and ledger.shards[1].later_rejects == 3
    assert ledger.reasons == {"prefilter": {"caption_empty": 1, "duplicate": 2}, "download": {"http_404": 3, "timeout": 1},
                              "clip": {"clip_similarity_low": 2}}
    assert ledger.funnel(MODES) == EXPECTED_FUNNEL
    assert funnel_from(INPUT_ROWS, footers, MODES) == EXPECTED_FUNNEL
    # Without modes every stage counts as a filter and is listed, empty or not.
    assert [(f["stage"], f["in"], f["out"]) for f in ledger.funnel()] == [
        ("prefilter", 18, 15), ("blocklist", 15, 15), ("optout", 15, 15), ("toxicity", 15, 15), ("download", 15, 11), ("decode", 11, 11), ("resize", 11, 11),
        ("clip", 11, 9), ("nsfw", 9, 9), ("t5", 9, 9), ("dedup", 9, 9), ("subset", 9, 9)]
    # An "off" stage that still rejected rows stays in the funnel (so the numbers add up).
    assert [f["stage"] for f in ledger.funnel({**MODES, "clip": "off"})] == ["prefilter", "download", "decode", "resize", "clip"]


def test_ledger_from_a_hand_written_dataset_directory(dataset):
    root, footers = dataset
    found = Ledger.from_files(str(root), list_tars=True)
    assert sorted(found.shards) == [0, 1]
    s0, s1 = found.shards[0], found.shards[1]
    assert (s0.samples, s0.rejected, s1.samples, s1.rejected) == (4, 6, 5, 3)
    assert s0.reasons == {"download": {"http_404": 3}, "prefilter": {"caption_empty": 1, "duplicate": 2}}
    assert s0.tar_bytes == (root / "shards/000000.tar").stat().st_size and s0.tar_keys == (4, 0, 0)
    assert s1.rejects_bytes == (root / "rejects/000001.parquet").stat().st_size
    assert found.bytes_by_kind() == {kind: sum(p.stat().st_size for p in (root / kind).iterdir()) for kind in ("meta", "rejects", "shards")}
    assert (found.kept, found.rejected, found.input_rows) == (9, 9, None)
    assert found.funnel(MODES) == EXPECTED_FUNNEL  # starts from kept + rejected when the input count is unknown

    assert read_footers(str(root)).keys() == footers.keys()
    result = check(found, Ledger.from_footers(INPUT_ROWS, read_footers(str(root))))
    assert result["ok"] and (result["input_rows"], result["kept"], result["rejected"]) == (18, 9, 9)
    assert [c["name"] for c in result["checks"]] == [
        "one shard count", "all shards complete", "one configuration", "shard files match the footers",
        "per-shard candidates == kept + later rejects", "input rows == kept + rejected", "every reject has a known stage"]
    assert check_accounting(str(root), INPUT_ROWS, read_footers(str(root)), None) == {
        **result, "checks": check(Ledger.from_files(str(root)), Ledger.from_footers(INPUT_ROWS, footers))["checks"]}


def _counters(**changed) -> dict:
    """Beam counters that agree with SHARDS (prefilter, download, decode, resize, clip ran)."""
    c = {"read/rows": 18, "write/samples": 9}
    for stage, (n_in, n_rej) in {"prefilter": (18, 3), "download": (15, 4), "decode": (11, 0), "resize": (11, 0), "clip": (11, 2)}.items():
        c.update({f"{stage}/in": n_in, f"{stage}/out": n_in - n_rej, f"{stage}/rejected": n_rej})
    return {**c, **{k.replace("__", "/"): v for k, v in changed.items()}}


def test_counters_that_agree_pass(dataset):
    root, footers = dataset
    result = check(Ledger.from_files(str(root)), Ledger.from_footers(INPUT_ROWS, footers), counters=_counters())
    assert result["ok"] and len(result["checks"]) == 7 + 1 + 5 + 4 + 1


def _append(path, data=b"\0" * 512):
    with open(path, "ab") as f:
        f.write(data)


def _rewrite_rejects(root, shard, rows):
    pq.write_table(pa.table({"uid": [f"r{i}" for i in range(len(rows))], "stage": [s for s, _ in rows], "reason": [r for _, r in rows]}),
                   root / "rejects" / f"{shard:06d}.parquet")


# (id, change to the dataset or what the run claims, problem the error must name)
FAILURES = [
    ("missing shard", lambda root, footers, kw: [(root / "meta/000001.parquet").unlink(), footers.pop(1)],
     [r"all shards complete: shard 000001: missing from the footers",
      r"shards/000001.tar: on disk but not in the footers", r"rejects/000001.parquet: on disk but not in the footers",
      r"input rows == kept \+ rejected: 18 input rows, 4 kept \+ 9 rejected = 13"]),
    ("missing tar", lambda root, footers, kw: (root / "shards/000000.tar").unlink(),
     [r"shards/000000.tar: listed in the footers but missing on disk"]),
    ("missing rejects file", lambda root, footers, kw: (root / "rejects/000001.parquet").unlink(),
     [r"rejects/000001.parquet: listed in the footers but missing on disk", r"18 input rows, 9 kept \+ 6 rejected = 15"]),
    ("tar size differs from its footer", lambda root, footers, kw: _append(root / "shards/000001.tar"),
     [r"shard files match the footers: shards/000001.tar: \d+ bytes on disk, its footer says \d+"]),
    ("rejects size differs from its footer", lambda root, footers, kw: footers[0]["rejects_file"].update(bytes=1),
     [r"rejects/000000.parquet: \d+ bytes on disk, its footer says 1$"]),
    ("unreadable rejects file", lambda root, footers, kw: (root / "rejects/000000.parquet").write_bytes(b""),
     [r"rejects/000000.parquet: unreadable \(", r"rejects/000000.parquet: 0 bytes on disk, its footer says \d+"]),
    ("meta rows differ from footer samples", lambda root, footers, kw: footers[1].update(samples=6, candidates=9),
     [r"meta/000001.parquet: 5 rows, its footer says 6 samples"]),
    ("rejects rows differ from the footer", lambda root, footers, kw: _rewrite_rejects(root, 1, [("download", "timeout")]),
     [r"rejects/000001.parquet: 1 rows, its footer says 3 rejected"]),
    ("rejects reasons differ from the footer", lambda root, footers, kw: _rewrite_rejects(
        root, 1, [("download", "timeout"), ("clip", "clip_similarity_low"), ("clip", "clip_error")]),
     [r"rejects/000001.parquet: rows by stage and reason \{.*'clip_error': 1.*\}, its footer says"]),
    ("candidates != kept + later rejects", lambda root, footers, kw: footers[0].update(candidates=8),
     [r"per-shard candidates == kept \+ later rejects: shard 000000: 8 candidates != 4 kept \+ 3 later rejects"]),
    ("input rows != kept + rejected", lambda root, footers, kw: kw.update(input_rows=19),
     [r"input rows == kept \+ rejected: 19 input rows, 9 kept \+ 9 rejected = 18"]),
    ("two fingerprints", lambda root, footers, kw: footers[1].update(config_fingerprint="other"),
     [r"one configuration: 2 configuration fingerprints in the footers: \['fp', 'other'\]"]),
    ("two shard counts", lambda root, footers, kw: footers[1].update(num_shards=3),
     [r"one shard count: different shard counts in the footers: \[2, 3\]"]),
    ("shard beyond the shard count", lambda root, footers, kw: [f.update(num_shards=1) for f in footers.values()],
     [r"shard 000001: listed in the footers, but num_shards is 1"]),
    ("unknown stage", lambda root, footers, kw: [_rewrite_rejects(root, 1, [("download", "timeout"), ("bogus", "x"), ("clip", "clip_similarity_low")]),
                                                 footers[1].update(rejects_by_reason={"download": {"timeout": 1}, "bogus": {"x": 1}, "clip": {"clip_similarity_low": 1}})],
     [r"every reject has a known stage: rejects parquet: unknown stages \['bogus'\]"]),
    ("rows read != input rows", lambda root, footers, kw: kw.update(counters=_counters(read__rows=17)),
     [r"rows read by the job == rows in the input footers: job read 17, footers hold 18"]),
    ("stage counters do not balance", lambda root, footers, kw: kw.update(counters=_counters(download__out=12)),
     [r"download: in == out \+ rejected \(this run's counters\): download: in 15, out 12, rejected 4",
      r"download out == decode in \(this run's counters\): download out 12, decode in 11"]),
    ("last stage out != samples written", lambda root, footers, kw: kw.update(counters=_counters(write__samples=8)),
     [r"clip out == samples written: clip out 9, 8 samples written"]),
]


@pytest.mark.parametrize("change, problems", [pytest.param(f, p, id=name) for name, f, p in FAILURES])
def test_every_failure_raises_accounting_error_naming_the_problem(dataset, change, problems):
    root, footers = dataset
    kw = {"input_rows": INPUT_ROWS, "counters": None}
    change(root, footers, kw)
    with pytest.raises(AccountingError) as err:
        check(Ledger.from_files(str(root)), Ledger.from_footers(kw["input_rows"], footers), counters=kw["counters"])
    message = str(err.value)
    assert message.startswith("accounting failed:\n")
    for problem in problems:
        assert re.search(problem, message, re.M), (problem, message)
    assert err.value.result["ok"] is False
    failed = [c for c in err.value.result["checks"] if not c["ok"]]
    assert failed and all(any(line.startswith(c["name"] + ": ") for line in err.value.problems) for c in failed)


def test_tar_members_are_checked_against_the_meta_uids(dataset):
    root, _ = dataset
    uids = [_uid(0, i) for i in range(3)] + ["f" * 32]  # same count, one sample swapped
    (root / "shards/000000.tar").write_bytes(_tar_bytes(uids))
    manifest = {"num_shards": 2, "samples": 9, "shards": [
        {"shard": "000000", "samples": 4, "rejected": 6, "bytes": (root / "shards/000000.tar").stat().st_size},
        {"shard": "000001", "samples": 5, "rejected": 3, "bytes": (root / "shards/000001.tar").stat().st_size}]}
    claimed = Ledger.from_manifest(manifest, INPUT_ROWS)
    assert check(Ledger.from_files(str(root)), claimed)["ok"]  # sizes alone agree
    with pytest.raises(AccountingError, match=r"shards/000000.tar: holds 4 samples, meta parquet lists 4 \(1 only in the tar, 1 only in the meta\)"):
        check(Ledger.from_files(str(root), list_tars=True), claimed)


def _stats(**changed) -> dict:
    return {"input": {"rows": INPUT_ROWS}, "kept": 9, "rejected": 9, "num_shards": 2, "accounting": {"ok": True},
            "stage_modes": MODES, "funnel": EXPECTED_FUNNEL, **changed}


def _manifest(root, **changed) -> dict:
    shards = [{"shard": f"{i:06d}", "samples": s["kept"], "rejected": len(s["rejects"]),
               "bytes": (root / f"shards/{i:06d}.tar").stat().st_size} for i, s in SHARDS.items()]
    return {"num_shards": 2, "samples": 9, "shards": shards, **changed}


def test_the_cards_check_against_manifest_and_stats(dataset):
    """The card's view: the files against manifest.json, with stats.json's totals and funnel."""
    root, _ = dataset
    found = Ledger.from_files(str(root), list_tars=True)
    result = check(found, Ledger.from_manifest(_manifest(root), INPUT_ROWS), stats=_stats())
    assert result["ok"] and [c["name"] for c in result["checks"]] == [
        "one shard count", "all shards complete", "shard files match manifest.json", "input rows == kept + rejected",
        "every reject has a known stage", "stats.json matches the files"]
    funnel = [dict(f) for f in EXPECTED_FUNNEL]
    funnel[1] = {**funnel[1], "out": 12, "rejected": 3}
    cases = [
        (_manifest(root), _stats(kept=10), r"stats.json: kept 10, meta parquet files hold 9 rows"),
        (_manifest(root), _stats(rejected=8), r"stats.json: rejected 8, rejects parquet files hold 9 rows"),
        (_manifest(root), _stats(num_shards=3), r"stats.json: num_shards 3, manifest.json lists 2"),
        (_manifest(root), _stats(accounting={"ok": False}), r"the run's own accounting did not pass"),
        (_manifest(root), _stats(funnel=funnel), r"funnel differs from the rejects files \(stage: \(in, out, rejected, reasons\)\): download: "),
        (_manifest(root), _stats(input={}), r"stats.json: no input row count"),
        (_manifest(root, samples=10), _stats(), r"manifest.json: samples 10, meta parquet files hold 9 rows"),
        (_manifest(root, num_shards=3), _stats(), r"different shard counts in manifest.json: \[2, 3\]"),
        ({**_manifest(root), "shards": _manifest(root)["shards"][:1]}, _stats(),
         r"meta/000001.parquet: on disk but not in manifest.json"),
    ]
    for manifest, stats, problem in cases:
        with pytest.raises(AccountingError, match=problem):
            check(found, Ledger.from_manifest(manifest, stats.get("input", {}).get("rows")), stats=stats)
