"""`kiln recheck` (issue 17, part 3): owners who opt out after a dataset was made are found.

A consent web (pipeline.testbed.synth, consent_per_kind=1: a main site and extra 127.0.0.1 sites with
robots.txt and tdmrep.json) is served, `kiln prepare` makes the parent with the model stages off,
then the server changes some sites' robots.txt, the main tdmrep.json and one image's X-Robots-Tag /
tdm-reservation header (SynthServer.set_route), and `kiln recheck` must list exactly those uids.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as kiln
from pipeline.fetch import FetchResult
from pipeline.recheck import build_report, head_verdict, signal_of
from pipeline.testbed import prepare_config
from pipeline.testbed.server import SynthServer
from pipeline.testbed.synth import SITE_ROBOTS, synthesize

MODELS_OFF = ("--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5", "off")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("recheck-web")
    w = synthesize(root, rows=40, seed=5, failure_rate=0.0, consent_per_kind=1)
    with SynthServer(w) as server:
        yield w, server


@pytest.fixture(scope="module")
def parent(web, tmp_path_factory):
    from pipeline.prepare import run

    w, server = web
    out = tmp_path_factory.mktemp("recheck-parent") / "ds"
    cfg = prepare_config(str(w.metadata_path), str(out), server.allow_hosts, "--quiet", "--image-size", "32", "--no-card",
                         "--download-timeout", "5", "--samples-per-shard", "20", *MODELS_OFF, *w.consent_flags)
    stats = run(cfg, [])
    kept = [r for p in sorted((out / "meta").glob("*.parquet")) for r in pq.read_table(p, columns=["uid", "URL"]).to_pylist()]
    assert len(kept) == stats["kept"] > 20
    return out, kept


@pytest.fixture
def routes(web):
    """set(key, route) changes the served web for one test; everything is put back afterwards."""
    _, server = web
    saved = {}

    def change(key, route):
        saved.setdefault(key, server.route(key))
        server.set_route(key, route)

    yield change
    for key, route in saved.items():
        server.set_route(key, route)


def _target(url: str) -> str:
    """The server's route key of `url` on its site: the path, with the query where the route has one."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _site_of(w, url: str) -> str | None:
    port = urlsplit(url).port
    return next((name for name, p in w.sites.items() if p == port), None)


def _recheck(parent_dir: Path, out: Path, *flags: str) -> tuple[list[str], dict]:
    rc = kiln(["recheck", str(parent_dir), "--out", str(out), "--quiet", *flags])
    assert rc == 0
    text = out.read_text()
    uids = text.splitlines()
    assert uids == sorted(uids) and (text == "" or text.endswith("\n"))
    return uids, json.loads(Path(str(out) + ".json").read_text())



@pytest.mark.slow  # one `kiln prepare` for the module (~10 s), then a Beam job per recheck
def test_an_unchanged_web_yields_an_empty_list_politely(web, parent, tmp_path):
    w, server = web
    out_dir, kept = parent
    origins = {f"http://{urlsplit(r['URL']).hostname}:{urlsplit(r['URL']).port}" for r in kept}
    sites = {_site_of(w, r["URL"]) for r in kept}
    before = {(s, p, m): server.requests(p, s, m) for s in sites for p in ("/robots.txt", "/.well-known/tdmrep.json") for m in ("GET", "HEAD")}
    paths = {(_site_of(w, r["URL"]), _target(r["URL"])) for r in kept}
    before_img = {k: (server.requests(k[1], k[0], "HEAD"), server.requests(k[1], k[0], "GET")) for k in paths}

    uids, report = _recheck(out_dir, tmp_path / "drop.txt")

    assert uids == [] and report["dropped"] == 0 and report["dropped_uids"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drop.txt", "drop.txt.json"]  # the job's own files are gone
    assert report["samples_checked"] == len(kept) and report["hosts_checked"] == len(origins)
    assert report["outcomes"] == {"ok": {"-": len(kept)}}
    assert report["head"] == {"enabled": True, "urls": len(kept), "optouts": 0, "failed": {}}
    assert report["unavailable"]["hosts"] == [] and report["unavailable"]["policy"] == "drop"
    # Politeness: each rule file once per origin; one HEAD per kept URL and no GET of any image.
    for (s, p, m), n in before.items():
        assert server.requests(p, s, m) - n == (1 if m == "GET" else 0), (s, p, m)
    per_path = {}
    for r in kept:
        key = (_site_of(w, r["URL"]), _target(r["URL"]))
        per_path[key] = per_path.get(key, 0) + 1
    for key, n in per_path.items():
        head0, get0 = before_img[key]
        assert (server.requests(key[1], key[0], "HEAD") - head0, server.requests(key[1], key[0], "GET") - get0) == (n, 0), key


@pytest.mark.slow  # one `kiln prepare` for the module (~10 s), then a Beam job per recheck
def test_owners_who_changed_their_signals_are_listed_with_reasons(web, parent, routes, tmp_path):
    w, server = web
    out_dir, kept = parent
    by_site: dict = {}
    for r in kept:
        by_site.setdefault(_site_of(w, r["URL"]), []).append(r)
    assert {"norules", "star", "slow"} <= set(by_site), sorted(map(str, by_site))
    plain = sorted((r for r in by_site[None] if urlsplit(r["URL"]).path.count("/") == 1 and not urlsplit(r["URL"]).query),
                   key=lambda r: r["uid"])
    assert len(plain) >= 4
    reserved, noai, tdm_header = plain[0], plain[1], plain[2]
    expected = {}
    # norules: had no robots.txt (404) at prepare time; now disallows everything for everyone.
    routes("@norules/robots.txt", {"body": "User-agent: *\nDisallow: /\n", "content_type": "text/plain"})
    expected.update({r["uid"]: "robotstxt_disallowed" for r in by_site["norules"]})
    # star: adds a GPTBot group that disallows what `*` still allows.
    routes("@star/robots.txt", {"body": SITE_ROBOTS["star"] + "\nUser-agent: GPTBot\nDisallow: /\n", "content_type": "text/plain"})
    expected.update({r["uid"]: "robotstxt_ai_optout" for r in by_site["star"]})
    # slow: its robots.txt now answers 500 -- RFC 9309's complete disallow.
    routes("@slow/robots.txt", {"status": 500})
    expected.update({r["uid"]: "robotstxt_unavailable" for r in by_site["slow"]})
    # main site: a tdmrep.json rule reserving one image, X-Robots-Tag on another, the TDMRep header on a third.
    tdm = json.loads((w.images_dir / server.route("/.well-known/tdmrep.json")["file"]).read_text())
    rule = {"location": urlsplit(reserved["URL"]).path + "$", "tdm-reservation": 1}
    routes("/.well-known/tdmrep.json", {"body": json.dumps([rule, *tdm]), "content_type": "application/json"})
    expected[reserved["uid"]] = "tdmrep_reserved"
    for row, headers, reason in ((noai, {"X-Robots-Tag": "kiln: noai"}, "robots_noai"),
                                 (tdm_header, {"tdm-reservation": "1"}, "tdm_reservation")):
        path = urlsplit(row["URL"]).path
        routes(path, {**server.route(path), "headers": headers})
        expected[row["uid"]] = reason

    uids, report = _recheck(out_dir, tmp_path / "drop.txt")

    assert uids == sorted(expected)
    assert {u: e["reason"] for u, e in report["dropped_uids"].items()} == expected
    signals = {"robotstxt_disallowed": "robots_txt", "robotstxt_ai_optout": "robots_txt", "robotstxt_unavailable": "robots_txt",
               "tdmrep_reserved": "tdmrep", "tdm_reservation": "tdmrep", "robots_noai": "x_robots_tag"}
    assert all(e["signal"] == signals[e["reason"]] for e in report["dropped_uids"].values())
    assert report["dropped_by_reason"] == {r: sum(1 for v in expected.values() if v == r) for r in sorted(set(expected.values()))}
    assert report["dropped_by_signal"] == {s: sum(1 for v in expected.values() if signals[v] == s) for s in ("robots_txt", "tdmrep", "x_robots_tag")}
    slow_origin = w.site_url("slow") + ""
    [host] = report["unavailable"]["hosts"]
    assert (host["origin"], host["robots"], host["samples"]) == (slow_origin, "unavailable", len(by_site["slow"]))
    assert "http_500" in host["robots_detail"]
    detail = report["dropped_uids"][noai["uid"]]["detail"]
    assert "kiln: noai" in detail

    # --on-unavailable report: the unreachable host's samples are held, not listed.
    uids2, report2 = _recheck(out_dir, tmp_path / "drop2.txt", "--on-unavailable", "report")
    held = {r["uid"] for r in by_site["slow"]}
    assert uids2 == sorted(set(expected) - held)
    assert set(report2["held_uids"]) == held and report2["unavailable"]["samples"] == len(held)

    # --no-head: the rule files only; the header opt-outs are not seen.
    uids3, report3 = _recheck(out_dir, tmp_path / "drop3.txt", "--no-head")
    assert uids3 == sorted(set(expected) - {noai["uid"], tdm_header["uid"]})
    assert report3["head"]["urls"] == 0


@pytest.mark.slow  # one `kiln prepare` for the module (~10 s), then a Beam job per recheck
def test_heads_per_host_stay_within_the_rate_and_concurrency_limits(web, parent, routes, tmp_path):
    w, server = web
    out_dir, kept = parent
    main = [r for r in kept if _site_of(w, r["URL"]) is None and not urlsplit(r["URL"]).query]
    # Rate: 10 HEADs per second to the main site for the whole job (1 bucket).
    n_main = sum(1 for r in kept if _site_of(w, r["URL"]) is None)
    since = len(server.request_times(None))
    uids, _ = _recheck(out_dir, tmp_path / "rate.txt", "--per-host-rate", "10", "--per-host-concurrency", "1", "--per-host-buckets", "1")
    times = server.request_times(None)[since:]
    assert uids == [] and len(times) == n_main + 2  # robots.txt, tdmrep.json, one HEAD per URL
    heads = times[2:]
    assert n_main >= 8 and heads[-1] - heads[0] >= (n_main - 1) / 10 * 0.95
    for path in {urlsplit(r["URL"]).path for r in main}:
        routes(path, {**server.route(path), "delay": 0.15})  # slow answers, so requests would pile up if allowed
    server.max_in_flight(None, reset=True)
    uids, report = _recheck(out_dir, tmp_path / "drop.txt", "--per-host-concurrency", "2", "--per-host-buckets", "1")
    assert uids == [] and report["settings"]["per_host_concurrency"] == 2
    assert server.max_in_flight(None) == 2  # concurrent, and never more than K


@pytest.mark.slow  # one `kiln prepare` for the module (~10 s), then a Beam job per recheck
def test_a_parent_without_success_and_an_existing_out_are_one_line(parent, tmp_path, capsys):
    out_dir, _ = parent
    rc = kiln(["recheck", str(tmp_path), "--out", str(tmp_path / "x.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "_SUCCESS" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    existing = tmp_path / "mine.txt"
    existing.write_text("keep me\n")
    rc = kiln(["recheck", str(out_dir), "--out", str(existing)])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert existing.read_text() == "keep me\n" and not Path(str(existing) + ".json").exists()
    assert not list(tmp_path.glob("*.tmp-*"))


# -- pure functions (no network) -----------------------------------------------------------------


def test_head_verdicts():
    ok = FetchResult("u", None, "empty_body", "200 OK with 0 bytes", status=200)
    assert head_verdict(ok) == ("ok", None, "200")
    assert head_verdict(FetchResult("u", b"x", None, status=200)) == ("ok", None, "200")
    assert head_verdict(FetchResult("u", None, "robots_noai", "X-Robots-Tag: noai", status=200))[:2] == ("optout", "robots_noai")
    assert head_verdict(FetchResult("u", None, "tdm_reservation", "tdm-reservation: 1", status=302))[:2] == ("optout", "tdm_reservation")
    assert head_verdict(FetchResult("u", None, "http_404", "404 Not Found", status=404))[:2] == ("head_failed", "http_404")
    assert head_verdict(FetchResult("u", None, "empty_body", "204", status=None))[:2] == ("head_failed", "empty_body")
    assert head_verdict(FetchResult("u", None, "private_address", "127.0.0.2 is loopback"))[:2] == ("head_failed", "private_address")


def test_signals_and_the_unavailable_policy():
    assert [signal_of(r) for r in ("robotstxt_ai_optout", "tdmrep_unavailable", "tdm_reservation", "robots_noimageai")] == \
        ["robots_txt", "tdmrep", "tdmrep", "x_robots_tag"]
    with pytest.raises(ValueError):
        signal_of("http_404")
    flagged = [{"uid": "b", "origin": "http://h:80", "reason": "robotstxt_unavailable", "detail": "http_503"},
               {"uid": "a", "origin": "http://g:80", "reason": "robots_noai", "detail": "X-Robots-Tag: noai"}]
    origins = [{"origin": "http://h:80", "robots": "unavailable", "tdmrep": "none", "samples": 3, "flagged": 3},
               {"origin": "http://g:80", "robots": "ok", "tdmrep": "none", "samples": 2, "flagged": 1}]
    counts = {"unavailable": {"robotstxt_unavailable": 1}, "optout": {"robots_noai": 1}, "ok": {"-": 3}}
    uids, result = build_report(flagged, counts, origins, "drop", {})
    assert uids == ["a", "b"] and result["dropped_by_reason"] == {"robots_noai": 1, "robotstxt_unavailable": 1}
    assert result["samples_checked"] == 5 and result["hosts_checked"] == 2 and result["unavailable"]["samples"] == 3
    uids, result = build_report(flagged, counts, origins, "report", {})
    assert uids == ["a"] and list(result["held_uids"]) == ["b"] and result["dropped_by_signal"]["robots_txt"] == 0


def test_head_falls_back_to_a_one_byte_get_on_405_and_501():
    from pipeline.recheck import head_url

    class Fake:
        def __init__(self, result):
            self.result, self.calls = result, []

        def fetch(self, url, on_throttle=None, **kw):
            self.calls.append((url, kw))
            return self.result

    for status, fallback in ((405, True), (501, True), (404, False), (200, False)):
        head = Fake(FetchResult("u", None, f"http_{status}" if status != 200 else "empty_body", status=status))
        get = Fake(FetchResult("u", b"\xff", None, status=200))
        result = head_url(head, get, "http://h/x.jpg")
        assert len(head.calls) == 1 and len(get.calls) == int(fallback), status
        if fallback:
            assert get.calls[0][1]["max_bytes"] == 1 and get.calls[0][1]["truncate"] is True
            assert head_verdict(result)[0] == "ok"


def test_settings_come_from_the_parent_unless_overridden():
    import argparse

    from pipeline.recheck import add_recheck_args, config_from
    from pipeline.errors import UserError

    parser = argparse.ArgumentParser()
    add_recheck_args(parser)
    flags = {"url_col": "url", "allow_hosts": "127.0.0.1:9", "user_agent_token": "kilnx", "ai_crawler_tokens": ["CCBot"],
             "per_host_concurrency": 8, "per_host_buckets": 2, "download_timeout": 3.0, "disallowed_directives": ["noai"]}
    cfg = config_from(parser.parse_args(["p", "--out", "o"]), flags)
    assert (cfg.url_col, cfg.download.allow_hosts, cfg.download.user_agent_token, cfg.ai_crawler_tokens) == ("url", "127.0.0.1:9", "kilnx", ("CCBot",))
    assert (cfg.download.per_host_concurrency, cfg.download.per_host_buckets, cfg.download.timeout_s) == (8, 2, 3.0)
    assert cfg.download.disallowed_directives == ("noai",) and cfg.on_unavailable == "drop" and cfg.head
    cfg = config_from(parser.parse_args(["p", "--out", "o", "--url-col", "URL2", "--allow-hosts", "127.0.0.1:10",
                                         "--ai-crawler-tokens", "GPTBot, ClaudeBot", "--per-host-concurrency", "3",
                                         "--per-host-buckets", "1", "--no-head"]), flags)
    assert (cfg.url_col, cfg.download.allow_hosts, cfg.ai_crawler_tokens) == ("URL2", "127.0.0.1:10", ("GPTBot", "ClaudeBot"))
    assert (cfg.download.per_host_concurrency, cfg.download.per_host_buckets, cfg.head) == (3, 1, False)
    with pytest.raises(UserError, match="per-host-buckets"):
        config_from(parser.parse_args(["p", "--out", "o", "--per-host-concurrency", "1"]), flags)
    with pytest.raises(UserError, match="allow-hosts"):
        config_from(parser.parse_args(["p", "--out", "o", "--allow-hosts", "http://x"]), flags)
    with pytest.raises(UserError, match="nothing to check"):
        config_from(parser.parse_args(["p", "--out", "o", "--no-head", "--no-robots-txt", "--no-tdmrep"]), flags)
