"""Consent and provenance: which opt-out protocol and which blocklist removed which rows, in one table.

The checks themselves live where the data they need exists:

  blocklist stage  (pipeline.optout.Blocklist)   SAMPLE_ID, URL sha256/md5 and domain entries of --blocklist
  optout stage     (pipeline.optout.OptOut)      --optout-list, robots.txt, TDMRep's /.well-known/tdmrep.json
                                                 (fetched once per origin for the whole job: pipeline.hostrules)
  download stage   (pipeline.fetch)              X-Robots-Tag, TDMRep's `tdm-reservation` response header
  decode stage     (pipeline.decode)             image sha256/md5 and PDQ entries of --blocklist, C2PA's
                                                 training-and-mining assertion

`PROTOCOLS` maps each opt-out protocol to the (stage, reason) pairs it rejects with, so the card, the
training summary and the tests count "rows removed per protocol" from the rejects files (the funnel's
reasons) and never from a second tally. Every `blocklist_*` reason, whatever its stage, belongs to
the blocklists.

stats.json's "consent" object (`consent_stats`), written by `kiln prepare`:

    {
      "user_agent": "kiln/0.1.0 (+...)", "user_agent_token": "kiln",
      "protocols": {
        "robots_txt":   {"enabled": bool, "ai_tokens": [..], "ttl_s": float,
                         "origins": int,              # origins whose robots.txt was consulted
                         "origins_no_rules": int,     # 4xx: no rules, everything allowed (RFC 9309 2.3.1.3)
                         "origins_unavailable": int,  # 5xx/429/unreachable: complete disallow (RFC 9309 2.3.1.4)
                         "on_unavailable": "disallow"},
        "tdmrep":       {"enabled": bool, "origins": int, "origins_with_file": int,
                         "origins_unavailable": int, "on_unavailable": "reserve", "header": bool},
        "x_robots_tag": {"enabled": bool, "directives": [..]},
        "optout_list":  {"enabled": bool, "files": [{"path", "sha256", "domains": int, "prefixes": int}]},
        "c2pa":         {"enabled": bool, "reader": "c2pa-python X.Y.Z" | null}
      },
      "blocklists": [{"name", "path", "sha256", "entries": {kind: int}, "pdq_threshold": int}]
    }

Counts of rows removed are not in it: they are the funnel's (`rows_removed(funnel)`).
"""

from __future__ import annotations

from pipeline.records import STAGE_DECODE, STAGE_DOWNLOAD, STAGE_OPTOUT

X_ROBOTS_REASON_PREFIX = "robots_"  # download/robots_<directive>

# protocol -> ((stage, reason), ...). x_robots_tag's reasons are download/robots_<directive>, one per
# directive honoured (`reasons_of` expands them).
PROTOCOLS = {
    "robots_txt": ((STAGE_OPTOUT, "robotstxt_disallowed"), (STAGE_OPTOUT, "robotstxt_ai_optout"),
                   (STAGE_OPTOUT, "robotstxt_unavailable")),
    "tdmrep": ((STAGE_OPTOUT, "tdmrep_reserved"), (STAGE_OPTOUT, "tdmrep_unavailable"), (STAGE_DOWNLOAD, "tdm_reservation")),
    "x_robots_tag": (),
    "optout_list": ((STAGE_OPTOUT, "optout_list"),),
    "c2pa": ((STAGE_DECODE, "c2pa_not_allowed"),),
}
PROTOCOL_TITLES = {
    "robots_txt": "robots.txt (RFC 9309)",
    "tdmrep": "TDMRep (W3C: tdmrep.json and the tdm-reservation header)",
    "x_robots_tag": "X-Robots-Tag response header",
    "optout_list": "offline opt-out list (--optout-list)",
    "c2pa": "C2PA training-and-mining assertion in the image",
}
BLOCKLIST_REASON_PREFIX = "blocklist_"


def reasons_of(protocol: str, reasons_by_stage: dict) -> dict:
    """{(stage, reason): rows} of `protocol` found in `reasons_by_stage` (stage -> reason -> rows,
    the funnel's or the rejects files' counts), zero for a listed reason that never occurred."""
    out = {pair: reasons_by_stage.get(pair[0], {}).get(pair[1], 0) for pair in PROTOCOLS[protocol]}
    if protocol == "x_robots_tag":
        for reason, n in reasons_by_stage.get(STAGE_DOWNLOAD, {}).items():
            if reason.startswith(X_ROBOTS_REASON_PREFIX):
                out[(STAGE_DOWNLOAD, reason)] = n
    return out


def blocklist_reasons(reasons_by_stage: dict) -> dict:
    """{(stage, reason): rows} of every blocklist_* reason, whatever its stage."""
    return {(stage, reason): n for stage, by_reason in reasons_by_stage.items() for reason, n in by_reason.items()
            if reason.startswith(BLOCKLIST_REASON_PREFIX)}


def reasons_by_stage(funnel: list[dict]) -> dict:
    """stage -> reason -> rows, from stats.json's funnel."""
    return {st["stage"]: dict(st.get("reasons") or {}) for st in funnel}


def rows_removed(funnel: list[dict]) -> dict:
    """protocol -> rows removed, plus "blocklists" -> rows removed by any list."""
    by_stage = reasons_by_stage(funnel)
    out = {p: sum(reasons_of(p, by_stage).values()) for p in PROTOCOLS}
    out["blocklists"] = sum(blocklist_reasons(by_stage).values())
    return out
