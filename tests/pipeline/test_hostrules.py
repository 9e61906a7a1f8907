"""pipeline/hostrules.py: robots.txt and tdmrep.json checks as pure functions, and fetching both
from small HTTP servers on 127.0.0.1 (the Site helpers of test_fetch.py)."""

from __future__ import annotations

import pickle
import time

import pytest
from protego import Protego

from pipeline import records
from pipeline.fetch import FetchConfig, Fetcher
from pipeline.hostrules import (
    ROBOTS_MAX_BYTES,
    HostRules,
    _group_name,
    check_url,
    fetch_host_rules,
    origin_of,
    parse_tdmrep,
)
from tests.pipeline.test_fetch import _no_dns, make_site, redirect, reply, site  # noqa: F401 (fixtures)

AI = ("CCBot", "GPTBot", "Google-Extended")
ORIGIN = "https://example.test:443"


def robots(text: str) -> HostRules:
    return HostRules(ORIGIN, 0.0, "ok", "200", text, "off", "", ())


def tdm(*rules, state="ok") -> HostRules:
    return HostRules(ORIGIN, 0.0, "off", "", "", state, "200", tuple(rules))


def reason(path: str, rules: HostRules, token: str = "kiln"):
    found = check_url(f"https://example.test{path}", rules, token, AI)
    return None if found is None else found[0]


# ---------------------------------------------------------------------------------------------
# robots.txt, pure


def test_optout_reasons_are_the_records_vocabulary():
    assert set(records.REASONS[records.STAGE_OPTOUT]) - {"optout_list"} == {
        "robotstxt_disallowed", "robotstxt_ai_optout", "robotstxt_unavailable", "tdmrep_reserved", "tdmrep_unavailable",
    }


def test_wildcard_and_end_anchor():
    rules = robots("User-agent: *\nDisallow: /*.png$\nDisallow: /private*/secret\n")
    assert reason("/a.png", rules) == "robotstxt_disallowed"
    assert reason("/deep/dir/b.png", rules) == "robotstxt_disallowed"
    assert reason("/a.png?x=1", rules) is None  # $ anchors the end of path + query
    assert reason("/a.pngx", rules) is None
    assert reason("/a.PNG", rules) is None  # paths are case-sensitive
    assert reason("/private-2/x/secret/1", rules) == "robotstxt_disallowed"
    assert reason("/private/nothing", rules) is None


def test_longest_match_lets_allow_override_disallow():
    rules = robots("User-agent: *\nDisallow: /img/\nAllow: /img/public/\n")
    assert reason("/img/a.jpg", rules) == "robotstxt_disallowed"
    assert reason("/img/public/a.jpg", rules) is None
    assert reason("/other.jpg", rules) is None
    # The longer Disallow wins back inside the allowed directory.
    rules = robots("User-agent: *\nDisallow: /img/\nAllow: /img/public/\nDisallow: /img/public/raw/\n")
    assert reason("/img/public/raw/a.jpg", rules) == "robotstxt_disallowed"


def test_percent_encoding_is_normalised():
    rules = robots("User-agent: *\nDisallow: /caf%C3%A9/\nDisallow: /a%2fb\n")
    assert reason("/café/x.jpg", rules) == "robotstxt_disallowed"  # IRI as found in alt-text data
    assert reason("/caf%c3%a9/x.jpg", rules) == "robotstxt_disallowed"
    assert reason("/a%2Fb", rules) == "robotstxt_disallowed"
    assert reason("/a/b", rules) is None  # an encoded slash stays distinct from a path separator
    assert reason("//double/slash.jpg", robots("User-agent: *\nDisallow: //double/\n")) == "robotstxt_disallowed"


def test_own_group_overrides_star_and_token_case():
    rules = robots("User-agent: *\nDisallow: /\n\nUser-agent: KILN\nDisallow: /kiln-only/\n")
    assert reason("/a.jpg", rules) is None  # kiln's own group replaces `*` entirely
    assert check_url("https://example.test/kiln-only/a.jpg", rules, "kiln", AI) == (
        "robotstxt_disallowed", "robots.txt group 'kiln' disallows /kiln-only/a.jpg",
    )
    assert reason("/a.jpg", rules, token="otherbot") == "robotstxt_disallowed"
    assert check_url("https://example.test/a.jpg", rules, "otherbot", ())[1] == "robots.txt group '*' disallows /a.jpg"


def test_ai_token_groups():
    text = (
        "User-agent: *\nAllow: /\n\n"
        "User-agent: GPTBot\nUser-agent: ccbot\nDisallow: /art/\n\n"
        "User-agent: Google-Extended\nAllow: /\n"
    )
    rules = robots(text)
    found = check_url("https://example.test/art/1.jpg", rules, "kiln", AI)
    assert found == ("robotstxt_ai_optout", "robots.txt group 'CCBot' disallows /art/1.jpg")  # case-insensitive token
    assert reason("/photo/1.jpg", rules) is None
    # Google-Extended's group allows everything: nothing to report.
    assert check_url("https://example.test/art/1.jpg", rules, "kiln", ("Google-Extended",)) is None


def test_ai_token_covered_only_by_star_is_plain_disallow():
    rules = robots("User-agent: *\nDisallow: /art/\n")
    assert reason("/art/1.jpg", rules) == "robotstxt_disallowed"  # kiln falls back to `*` too
    # With kiln's own group allowing, `*` alone does not opt out GPTBot & co. for us.
    rules = robots("User-agent: *\nDisallow: /art/\n\nUser-agent: kiln\nAllow: /\n")
    assert reason("/art/1.jpg", rules) is None


def test_ai_token_needs_its_own_name_not_a_prefix():
    # protego would apply a "Google" group to "Google-Extended" (prefix match); only an exact name counts.
    rules = robots("User-agent: Google\nDisallow: /\n")
    assert reason("/a.jpg", rules) is None
    assert check_url("https://example.test/a.jpg", rules, "kiln", ("google-extended",)) is None
    assert reason("/a.jpg", robots("User-agent: google-extended\nDisallow: /\n")) == "robotstxt_ai_optout"


def test_protego_group_selection_is_pinned():
    """_group_name reads protego's private selection: fail loudly if an upgrade changes it."""
    parser = Protego.parse("User-agent: *\nDisallow: /x\n\nUser-agent: GPTBot\nDisallow: /\n")
    assert _group_name(parser, "GPTBot") == "gptbot"
    assert _group_name(parser, "kiln") == "*"
    assert _group_name(Protego.parse("User-agent: a\nDisallow: /\n"), "kiln") is None


def test_robots_states_none_off_and_unavailable():
    for state in ("none", "off"):
        rules = HostRules(ORIGIN, 0.0, state, "404", "User-agent: *\nDisallow: /\n", "off", "", ())
        assert reason("/a.jpg", rules) is None  # the text is only read when the file was there
    rules = HostRules(ORIGIN, 0.0, "unavailable", "http_503: 503 Service Unavailable", "", "ok", "", (("/", 0, None),))
    assert check_url("https://example.test/a.jpg", rules, "kiln", AI) == (
        "robotstxt_unavailable", "http_503: 503 Service Unavailable",
    )
    assert check_url("ftp://example.test/a.jpg", rules, "kiln", AI) is None  # the fetcher refuses it anyway
    assert reason("/robots.txt", robots("User-agent: *\nDisallow: /\n")) is None  # always fetchable (protego)


# ---------------------------------------------------------------------------------------------
# tdmrep.json, pure


def test_tdmrep_first_match_decides():
    # TDMRep "TDM File on the Origin Server": "The most specific match is the first in sequence."
    rules = tdm(
        ("/directory-b/images/*.jpg", 0, None),
        ("/directory-b/", 1, "https://provider.test/policy.json"),
        ("/directory-a/", 1, None),
        ("/", 0, None),
        ("/late/", 1, None),  # shadowed by "/" before it
    )
    assert reason("/directory-b/images/cat.jpg", rules) is None
    assert check_url("https://example.test/directory-b/images/cat.png", rules, "kiln", AI) == (
        "tdmrep_reserved", "tdmrep.json location '/directory-b/', tdm-policy https://provider.test/policy.json",
    )
    assert check_url("https://example.test/directory-a/x", rules, "kiln", AI)[1] == (
        "tdmrep.json location '/directory-a/', tdm-policy none"
    )
    assert reason("/late/x.jpg", rules) is None
    assert reason("/Directory-a/x", rules) is None  # case-sensitive


def test_tdmrep_patterns_and_unset_reservation():
    rules = tdm(("/a/*.jpg$", 1, None), ("/u/", None, None), ("/u/", 1, None), ("", 1, None), ("/sp ace/", 1, None))
    assert reason("/a/b/c.jpg", rules) == "tdmrep_reserved"
    assert reason("/a/c.jpg?size=2", rules) is None
    assert reason("/a/c.jpeg", rules) is None
    assert reason("/u/x", rules) is None  # an unset reservation still matches first, reserving nothing
    assert reason("/elsewhere", rules) is None  # an empty location matches nothing; no match: not reserved
    assert reason("/sp%20ace/x", rules) == "tdmrep_reserved"


def test_tdmrep_states():
    assert check_url("https://example.test/a", tdm(state="unavailable"), "kiln", AI) == ("tdmrep_unavailable", "200")
    assert reason("/a", tdm(("/", 1, None), state="none")) is None
    # robots.txt is checked first.
    rules = HostRules(ORIGIN, 0.0, "ok", "200", "User-agent: *\nDisallow: /a\n", "ok", "", (("/", 1, None),))
    assert reason("/a", rules) == "robotstxt_disallowed"
    assert reason("/b", rules) == "tdmrep_reserved"


def test_parse_tdmrep():
    body = b'\xef\xbb\xbf[{"location": " /a/ ", "tdm-reservation": 1, "tdm-policy": "https://p.test/"},' \
           b' {"location": "/b/", "tdm-reservation": "0"}, {"location": "/c/", "tdm-reservation": 2, "tdm-policy": 5},' \
           b' {"location": "/d/", "tdm-reservation": true}, {"location": "/e/"}]'
    assert parse_tdmrep(body) == (
        ("/a/", 1, "https://p.test/"), ("/b/", 0, None), ("/c/", None, None), ("/d/", 1, None), ("/e/", None, None),
    )
    assert parse_tdmrep("[]") == ()
    for bad, message in [(b"[{", "not JSON"), (b"\xff\xfe[", "not JSON"), (b'{"location": "/"}', "not an array"),
                         (b'[{"tdm-reservation": 1}]', "rule 0"), (b'[{"location": 1}]', "rule 0"),
                         (b'[{"location": "/"}, 3]', "rule 1"), (b"[" * 100_000, "not JSON")]:
        with pytest.raises(ValueError, match=message):
            parse_tdmrep(bad)


def test_origin_of():
    assert origin_of("https://Example.TEST/a.jpg?x#y") == "https://example.test:443"
    assert origin_of("http://user:pw@example.test:8080/a") == "http://example.test:8080"
    assert origin_of("http://[::1]/a") == "http://[::1]:80"
    assert origin_of("http://bücher.test/a") == "http://bücher.test:80"
    assert origin_of("ftp://example.test/a") is None
    assert origin_of("not a url") is None
    assert origin_of(None) is None


# ---------------------------------------------------------------------------------------------
# fetch_host_rules against 127.0.0.1


def rules_of(site, timeout_s: float = 3.0, **kwargs) -> HostRules:
    config = FetchConfig(timeout_s=timeout_s, backoff_base_s=0.01, retries=1, allow_hosts=site.allow)
    with Fetcher(config, resolver=_no_dns) as fetcher:
        return fetch_host_rules(fetcher, origin_of(site.url("/")), now=lambda: 1234.5, **kwargs)


TEXT = "text/plain"
JSON = "application/json"


def test_fetch_ok_both(site):
    site.routes["/robots.txt"] = reply(body=b"User-agent: *\nDisallow: /private/\n", content_type=TEXT,
                                       headers=[("X-Robots-Tag", "noai"), ("tdm-reservation", "1")])
    site.routes["/.well-known/tdmrep.json"] = reply(body=b'[{"location": "/img/", "tdm-reservation": 1}]',
                                                    content_type=JSON)
    rules = rules_of(site)
    assert rules.origin == f"http://127.0.0.1:{site.port}" and rules.fetched_at == 1234.5
    assert (rules.robots, rules.robots_detail, rules.tdmrep, rules.tdmrep_rules) == (
        "ok", "200, 34 bytes", "ok", (("/img/", 1, None),),
    )
    assert pickle.loads(pickle.dumps(rules)) == rules
    assert reason_at(site, "/private/a.jpg", rules) == "robotstxt_disallowed"
    assert reason_at(site, "/img/a.jpg", rules) == "tdmrep_reserved"
    assert reason_at(site, "/a.jpg", rules) is None
    accepts = {path: headers["Accept"] for path, headers in site.requests}
    assert accepts == {"/robots.txt": "text/plain, */*;q=0.1", "/.well-known/tdmrep.json": "application/json, */*;q=0.1"}


def reason_at(site, path, rules):
    found = check_url(site.url(path), rules, "kiln", AI)
    return None if found is None else found[0]


def test_fetch_404_both(site):
    rules = rules_of(site)  # no routes: 404 for both
    assert (rules.robots, rules.robots_txt, rules.tdmrep, rules.tdmrep_rules) == ("none", "", "none", ())
    assert rules.robots_detail == "http_404: 404 Not Found"
    assert reason_at(site, "/a.jpg", rules) is None


@pytest.mark.parametrize("status", [500, 503, 429])
def test_fetch_server_errors_are_unavailable(site, status):
    site.routes["/robots.txt"] = reply(status, b"User-agent: *\nAllow: /\n", content_type=TEXT)
    site.routes["/.well-known/tdmrep.json"] = reply(status, b"[]", content_type=JSON)
    rules = rules_of(site)
    assert (rules.robots, rules.tdmrep) == ("unavailable", "unavailable")
    assert rules.robots_detail.startswith(f"http_{status}: {status} ")
    assert reason_at(site, "/a.jpg", rules) == "robotstxt_unavailable"
    assert check_url(site.url("/a.jpg"), rules_of(site, robots=False), "kiln", AI)[0] == "tdmrep_unavailable"


def test_fetch_slow_robots_is_unavailable(site):
    def slow(h):
        site.stop.wait(2.0)  # past the 0.5 s deadline

    site.routes["/robots.txt"] = slow
    start = time.monotonic()
    rules = rules_of(site, timeout_s=0.5, tdmrep=False)
    assert time.monotonic() - start < 1.5
    assert rules.robots == "unavailable" and rules.robots_detail.startswith("timeout: ")
    assert (rules.tdmrep, rules.tdmrep_detail) == ("off", "")
    assert site.paths() == ["/robots.txt"]


def test_fetch_unreachable_origin_is_unavailable(site):
    config = FetchConfig(timeout_s=2.0, retries=0)  # 127.0.0.1 not in allow_hosts: refused before connecting
    with Fetcher(config, resolver=_no_dns) as fetcher:
        rules = fetch_host_rules(fetcher, origin_of(site.url("/")))
    assert (rules.robots, rules.tdmrep) == ("unavailable", "unavailable")
    assert rules.robots_detail.startswith("private_address: 127.0.0.1 is loopback")
    assert site.paths() == []


def test_fetch_large_robots_is_truncated(site):
    head = b"User-agent: *\nDisallow: /head/\n"
    filler = b"# " + b"x" * 97 + b"\n"  # 100-byte comment lines
    body = head + filler * (ROBOTS_MAX_BYTES // 100 + 100) + b"Disallow: /tail/\n"
    site.routes["/robots.txt"] = reply(body=body, content_type=TEXT)
    rules = rules_of(site, tdmrep=False)
    assert rules.robots == "ok" and "truncated" in rules.robots_detail
    assert len(rules.robots_txt) <= ROBOTS_MAX_BYTES and rules.robots_txt.endswith("\n")
    assert reason_at(site, "/head/a.jpg", rules) == "robotstxt_disallowed"
    assert reason_at(site, "/tail/a.jpg", rules) is None  # past the 500 KiB that are read


def test_fetch_follows_redirects_to_the_rule_files(site, make_site):
    other = make_site()
    other.routes["/real-robots.txt"] = reply(body=b"User-agent: kiln\nDisallow: /\n", content_type=TEXT)
    site.routes["/robots.txt"] = redirect("/r2", 301)
    site.routes["/r2"] = redirect(other.url("/real-robots.txt"), 302)
    site.routes["/.well-known/tdmrep.json"] = redirect("/tdm/real.json", 308)
    site.routes["/tdm/real.json"] = reply(body=b'[{"location": "/", "tdm-reservation": 0}]', content_type=JSON)
    config = FetchConfig(timeout_s=3.0, allow_hosts=site.allow | other.allow)
    with Fetcher(config, resolver=_no_dns) as fetcher:
        rules = fetch_host_rules(fetcher, origin_of(site.url("/")))
    assert (rules.robots, rules.tdmrep, rules.tdmrep_rules) == ("ok", "ok", (("/", 0, None),))
    assert reason_at(site, "/a.jpg", rules) == "robotstxt_disallowed"  # the rules apply to the origin asked


def test_fetch_redirect_loop_means_no_file(site):
    site.routes["/robots.txt"] = redirect("/robots.txt")
    rules = rules_of(site, tdmrep=False)
    assert rules.robots == "none" and rules.robots_detail.startswith("too_many_redirects")


@pytest.mark.parametrize(
    "body, content_type, state",
    [
        (b'[{"location": "/", "tdm-reservation": 1}', JSON, "unavailable"),  # cut short: not JSON
        (b'{"location": "/", "tdm-reservation": 1}', JSON, "unavailable"),  # an object, not an array
        (b'[{"tdm-reservation": 1}]', JSON, "unavailable"),  # no location
        (b"<!doctype html><title>Not found</title>", "text/html", "none"),  # a soft 404: no file here
        (b"", JSON, "none"),
        (b"  \n", JSON, "none"),
        (b"[]", JSON, "ok"),
    ],
)
def test_fetch_tdmrep_bodies(site, body, content_type, state):
    site.routes["/.well-known/tdmrep.json"] = reply(body=body, content_type=content_type)
    rules = rules_of(site, robots=False)
    assert (rules.robots, rules.tdmrep, rules.tdmrep_rules) == ("off", state, ())
    assert len(rules.tdmrep_detail) < 300 and "tdm-reservation" not in rules.tdmrep_detail  # no body in details
    expected = "tdmrep_unavailable" if state == "unavailable" else None
    assert reason_at(site, "/a.jpg", rules) == expected


def test_fetch_empty_robots_allows_everything(site):
    site.routes["/robots.txt"] = reply(body=b"", content_type=TEXT)
    rules = rules_of(site, tdmrep=False)
    assert (rules.robots, rules.robots_txt) == ("ok", "")
    assert reason_at(site, "/a.jpg", rules) is None
