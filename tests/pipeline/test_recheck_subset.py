"""The consent loop end to end (issue 17): `kiln prepare` makes a parent from a served web, some
owners change their robots.txt on the running server, `kiln recheck PARENT --out drop.txt` lists
their samples, and `kiln subset PARENT --out CHILD --drop-uids drop.txt` removes exactly those.

The web, the parent and the route changer are test_recheck.py's fixtures (one web and one parent
for this module).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as kiln
from pipeline.records import STAGE_SUBSET
from pipeline.testbed.synth import SITE_ROBOTS
from tests.pipeline.test_recheck import _site_of, parent, routes, web  # noqa: F401 (fixtures)


def _rows(out: Path, sub: str, columns=None) -> list[dict]:
    return [r for p in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(p, columns=columns).to_pylist()]


@pytest.mark.slow  # one `kiln prepare` (~10 s), a recheck and a subset job
def test_recheck_then_subset_drops_exactly_the_owners_who_opted_out(web, parent, routes, tmp_path):
    w, _ = web
    parent_dir, kept = parent
    by_site: dict = {}
    for r in kept:
        by_site.setdefault(_site_of(w, r["URL"]), []).append(r["uid"])
    assert {"norules", "star"} <= set(by_site), sorted(map(str, by_site))
    # Two owners opt out after the parent was made: one disallows everything, one adds an AI-crawler group.
    routes("@norules/robots.txt", {"body": "User-agent: *\nDisallow: /\n", "content_type": "text/plain"})
    routes("@star/robots.txt", {"body": SITE_ROBOTS["star"] + "\nUser-agent: GPTBot\nDisallow: /\n", "content_type": "text/plain"})
    opted_out = set(by_site["norules"]) | set(by_site["star"])
    assert 0 < len(opted_out) < len(kept)

    drop = tmp_path / "drop.txt"
    assert kiln(["recheck", str(parent_dir), "--out", str(drop), "--quiet"]) == 0
    assert drop.read_text().splitlines() == sorted(opted_out)
    report = json.loads(Path(f"{drop}.json").read_text())
    assert set(report["dropped_uids"]) == opted_out

    child = tmp_path / "child"
    assert kiln(["subset", str(parent_dir), "--out", str(child), "--quiet", "--drop-uids", str(drop)]) == 0

    rejects = _rows(child, "rejects")
    assert {r["uid"] for r in rejects} == opted_out and len(rejects) == len(opted_out)
    assert {(r["stage"], r["reason"]) for r in rejects} == {(STAGE_SUBSET, "uid_dropped")}
    assert all(str(drop) in r["detail"] for r in rejects)
    child_kept = {r["uid"] for r in _rows(child, "meta", ["uid"])}
    assert child_kept == {r["uid"] for r in kept} - opted_out

    stats = json.loads((child / "stats.json").read_text())
    parent_stats = json.loads((parent_dir / "stats.json").read_text())
    acc = stats["accounting"]
    assert acc["ok"] and acc["input_rows"] == stats["input"]["rows"] == parent_stats["kept"] == len(kept)
    assert (acc["kept"], acc["rejected"]) == (len(kept) - len(opted_out), len(opted_out))
    [rule] = stats["subset"]["rules"]
    assert rule["rule"] == "drop_uids" and rule["reasons"] == "uid_dropped"
    assert rule["lists"] == [{"path": str(drop), "sha256": rule["lists"][0]["sha256"], "entries": len(opted_out)}]

    card = (child / "README.md").read_text()
    assert "uid_dropped" in card and "--drop-uids" in card and str(drop) in card
