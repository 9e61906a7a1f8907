"""The draft EU training-content summary: training_summary.json and training_summary.md.

Article 53(1)(d) of the AI Act (Regulation (EU) 2024/1689) asks every provider of a general-purpose
AI model to publish a summary of the content used to train it, following the AI Office's *Template
for the Public Summary of Training Content for general-purpose AI models* (European Commission, July
2025). Its sections: 1 General information (provider, model, modalities and size), 2 List of data
sources (2.1 publicly available datasets, 2.2 private datasets from third parties, 2.3 data crawled
and scraped from online sources, 2.4 user data, 2.5 synthetic data, 2.6 other sources), 3 Data
processing aspects (3.1 respect of reservations of rights from the text-and-data-mining exception,
3.2 removal of illegal content, 3.3 other information).

kiln knows one dataset: what it crawled, when, from which hosts, what it honoured and what it
removed. That is what this draft fills in, every number recounted from the dataset's files
(pipeline.card.facts) and stats.json; everything else -- the provider, the model, every other data
source -- is marked PROVIDER (`{"provider_must_complete": true, ...}` in the JSON) for the provider
to add. The JSON is the machine-readable twin: the Markdown is rendered from it, so both carry the
same numbers.

The shared views of the consent record (`opt_out_protocols`, `blocklist_entries`, `safety_filters`,
`top_domains`) are used by the card (pipeline.card.render) and croissant.json too.
"""

from __future__ import annotations

import json

from pipeline.card.facts import SCORES, Facts, pct
from pipeline.consent import PROTOCOL_TITLES, PROTOCOLS, blocklist_reasons, reasons_by_stage, reasons_of, rows_removed

TEMPLATE = ("European Commission (AI Office), Template for the Public Summary of Training Content for general-purpose "
            "AI models, Article 53(1)(d) of Regulation (EU) 2024/1689 (AI Act), July 2025")
TOP_DOMAIN_SHARE = 10  # per cent of domain names: the template asks for the top 10% by size of content
PROVIDER = "to be completed by the provider"
# The reasons each model filter removes rows for (its threshold), as opposed to `<stage>_error`.
FILTER_REASONS = {"toxicity": "toxic", "clip": "clip_similarity_low", "nsfw": "punsafe_high"}
SAFETY_STAGES = ("toxicity", "nsfw")  # the filters that remove harmful content; CLIP similarity is a quality filter
UNAVAILABLE_POLICY = {
    "disallow": "treated as a complete disallow (RFC 9309 §2.3.1.4): every URL of the origin removed",
    "reserve": "treated as a reservation of rights: every URL of the origin removed",
}


def _provider(what: str) -> dict:
    return {"provider_must_complete": True, "what": what}


# -- views of stats.json's consent record, shared with the card and croissant.json -----------------


def derivation(stats: dict) -> dict | None:
    """A `kiln subset` child's parent and rules (stats.json's "subset" object), or None for a dataset
    `kiln prepare` made: {parent: {path, config_fingerprint, card_sha256, ...}, rules, funnel} where
    funnel is the parent's funnel followed by the subset stage (rows from the parent's input rows)."""
    sub = stats.get("subset")
    if not isinstance(sub, dict) or not isinstance(sub.get("parent"), dict):
        return None
    parent = sub["parent"]
    funnel = [dict(f) for f in parent.get("funnel") or [] if isinstance(f, dict)]
    funnel += [dict(f) for f in stats.get("funnel") or [] if isinstance(f, dict) and f.get("stage") == "subset"]
    return {"parent": {k: parent.get(k) for k in ("path", "config_fingerprint", "manifest_sha256", "card_sha256",
                                                  "input_rows", "kept", "command")},
            "grandparent": (parent.get("subset") or {}).get("parent", {}).get("path") if isinstance(parent.get("subset"), dict) else None,
            "rules": list(sub.get("rules") or []), "warnings": list(sub.get("warnings") or []), "funnel": funnel}


def consent_of(stats: dict) -> dict | None:
    """stats.json's "consent" object (pipeline.consent), or None for a run that predates it."""
    consent = stats.get("consent")
    return consent if isinstance(consent, dict) else None


def opt_out_protocols(facts: Facts) -> list[dict] | None:
    """One entry per opt-out protocol (pipeline.consent.PROTOCOLS order): title, enabled, rows removed
    (the recounted funnel's reasons, pipeline.consent.rows_removed), per reason, and for the protocols
    fetched once per origin (robots.txt, TDMRep) the origins consulted and those whose rules could not
    be fetched, with what was done about them. None when stats.json has no consent record."""
    consent = consent_of(facts.stats)
    if consent is None:
        return None
    protocols = consent.get("protocols") if isinstance(consent.get("protocols"), dict) else {}
    by_stage = reasons_by_stage(facts.funnel)
    removed = rows_removed(facts.funnel)
    out = []
    for name in PROTOCOLS:
        p = protocols.get(name) if isinstance(protocols.get(name), dict) else {}
        entry = {
            "protocol": name,
            "title": PROTOCOL_TITLES[name],
            "enabled": bool(p.get("enabled")),
            "rows_removed": removed[name],
            "rows_removed_by_reason": {f"{stage}/{reason}": n for (stage, reason), n in reasons_of(name, by_stage).items()},
            "settings": {k: v for k, v in sorted(p.items()) if k != "enabled"},
        }
        if name in ("robots_txt", "tdmrep"):
            policy = p.get("on_unavailable")
            entry.update({"origins_consulted": p.get("origins"), "origins_unavailable": p.get("origins_unavailable"),
                          "on_unavailable": policy, "on_unavailable_means": UNAVAILABLE_POLICY.get(policy)})
        out.append(entry)
    return out


def blocklist_entries(facts: Facts) -> dict | None:
    """The --blocklist files applied: each list's name, file, sha256, entries per kind, PDQ threshold
    and rows it removed per reason (attributed by the reject's detail, which names the list), plus the
    rows removed per reason by all lists together (the funnel's). None without a consent record."""
    consent = consent_of(facts.stats)
    if consent is None:
        return None
    lists = [b for b in (consent.get("blocklists") or []) if isinstance(b, dict)]
    per_list = []
    for b in lists:
        rows = {reason: n for (name, reason), n in sorted(facts.blocklist_rows.items(), key=lambda kv: kv[0][1])
                if name == b.get("name")}
        per_list.append({"name": b.get("name"), "path": b.get("path"), "sha256": b.get("sha256"),
                         "entries": dict(b.get("entries") or {}), "pdq_threshold": b.get("pdq_threshold"),
                         "rows_removed_by_reason": rows, "rows_removed": sum(rows.values())})
    total = {f"{stage}/{reason}": n for (stage, reason), n in sorted(blocklist_reasons(reasons_by_stage(facts.funnel)).items())}
    unattributed = sum(n for (name, _), n in facts.blocklist_rows.items() if name is None)
    return {"lists": per_list, "rows_removed_by_reason": total, "rows_removed": sum(total.values()),
            "rows_not_attributed_to_a_list": unattributed}


def model_label(info: dict, fallback=None):
    """How a stats.json model entry names its model: the flag's value as given (spec), else the resolver's."""
    prov = info.get("provenance") if isinstance(info.get("provenance"), dict) else {}
    return info.get("spec") or prov.get("spec") or info.get("name") or info.get("weights_path") or fallback


def safety_filters(facts: Facts) -> list[dict]:
    """Each model filter (toxicity, CLIP similarity, NSFW): mode, threshold flag and value, which side
    it rejects, the model and its weight sha256, and rows removed (by its threshold; by scoring errors)."""
    flags, modes, models = facts.stats.get("flags", {}), facts.stats.get("stage_modes", {}), facts.stats.get("models", {})
    by_stage = reasons_by_stage(facts.funnel)
    out = []
    for score in SCORES:
        stage = score.stage
        model = models.get(stage) if isinstance(models.get(stage), dict) else {}
        reasons = by_stage.get(stage, {})
        out.append({
            "stage": stage, "title": score.title, "mode": modes.get(stage, "off"),
            "kind": "safety" if stage in SAFETY_STAGES else "quality",
            "threshold_flag": "--" + score.threshold_flag.replace("_", "-"), "threshold": flags.get(score.threshold_flag),
            "rejects": score.rejects, "score_column": score.column,
            "model": model_label(model, flags.get({"toxicity": "toxicity_model", "clip": "clip_model", "nsfw": "nsfw_head"}[stage])),
            "model_sha256": model.get("sha256"),
            "labels": flags.get("toxicity_labels") if stage == "toxicity" else None,
            "rows_removed": reasons.get(FILTER_REASONS[stage], 0),
            "rows_removed_by_scoring_errors": sum(n for r, n in reasons.items() if r.endswith("_error")),
        })
    return out


def top_domains(facts: Facts, percent: int = TOP_DOMAIN_SHARE) -> dict:
    """The hosts that make up the top `percent`% of domain names by downloaded bytes (meta's
    source_bytes, per pipeline.card.facts.host_of of the URL column): ceil(percent% of the distinct
    hosts), ranked by bytes (ties by name), each with its bytes and share of all kept bytes."""
    counter = facts.source_bytes_by_host
    if not facts.source_bytes_rows:
        return {"recorded": False, "rows_without_bytes": facts.source_bytes_missing,
                "why": "not recorded: the meta files have no source_bytes values (a dataset written before kiln recorded "
                       "the bytes downloaded per image)"}
    total = sum(counter.values())
    hosts = len(counter)
    listed = -(-hosts * percent // 100)  # ceil, in integers
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:listed]
    return {
        "recorded": True,
        "basis": ("bytes downloaded (meta column source_bytes) per host of the URL column, kept samples only; the host "
                  "as urllib.parse reads it, lowercased, with its port unless 80 or 443"),
        "percent_of_domains": percent,
        "domains_total": hosts,
        "domains_listed": listed,
        "bytes_total": total,
        "rows_with_bytes": facts.source_bytes_rows,
        "rows_without_bytes": facts.source_bytes_missing,
        "bytes_listed": sum(b for _, b in ranked),
        "domains": [{"domain": host, "bytes": b, "share": (b / total) if total else 0.0} for host, b in ranked],
    }


def collection_period(stats: dict) -> dict:
    """When the images were fetched, as far as the run records it: kiln keeps no per-image fetch
    time, so the run's own start and end (stats.json) bound it -- unless shards came from an earlier
    run (a resume), whose fetch times this run does not know."""
    parent = (stats.get("subset") or {}).get("parent") if isinstance(stats.get("subset"), dict) else None
    if isinstance(parent, dict) and isinstance(parent.get("collection_period"), dict):
        # `kiln subset` downloads nothing: its images were fetched when the parent was made.
        return {**parent["collection_period"], "basis": "the parent dataset's collection period (kiln subset downloads "
                "nothing): " + str(parent["collection_period"].get("basis"))}
    resumed = (stats.get("this_run") or {}).get("shards_skipped") or 0
    out = {"start": None if resumed else stats.get("started_at"), "end": stats.get("finished_at"),
           "basis": ("the run's start and end (stats.json started_at / finished_at); kiln does not record when each image "
                     "was fetched, so every fetch of this run lies between them"),
           "shards_from_an_earlier_run": resumed}
    if resumed:
        out["basis"] += (f"; {resumed} shard(s) were kept from an earlier run, fetched before this run started, at a time "
                         "this run does not record: the start is unknown")
    return out


# -- the summary -----------------------------------------------------------------------------------


def build_summary(facts: Facts, language: list[str] | None = None, marker: tuple[str, str] | None = None) -> dict:
    """training_summary.json's object. `marker`: (key, text) of pipeline.outdir's JSON marker, first."""
    st, flags = facts.stats, facts.stats.get("flags", {})
    consent = consent_of(st)
    files = (st.get("input") or {}).get("files") or []
    formats = dict(sorted(facts.formats.items(), key=lambda kv: (-kv[1], kv[0])))
    crawler = {"name": "kiln", "version": st.get("kiln_version"),
               "user_agent": consent.get("user_agent") if consent else None,
               "user_agent_token": (consent or {}).get("user_agent_token") or flags.get("user_agent_token")}
    protocols = opt_out_protocols(facts)
    blocklists = blocklist_entries(facts)
    filters = safety_filters(facts)
    funnel = [{k: f[k] for k in ("stage", "mode", "in", "out", "rejected")} for f in facts.funnel]
    out = {}
    if marker:
        out[marker[0]] = marker[1]
    out.update({
        "template": TEMPLATE,
        "status": ("draft written by kiln from one dataset it prepared; the provider completes every entry marked "
                   "provider_must_complete, adds every other training data source, and publishes the result"),
        "derived_from": derivation(st),  # `kiln subset`: the parent dataset and the rules (None: made by kiln prepare)
        "dataset": {"kiln_version": st.get("kiln_version"), "git_commit": st.get("git_commit"),
                    "config_fingerprint": st.get("config_fingerprint"), "input_rows": facts.input_rows,
                    "kept": facts.kept, "rejected": facts.rejected, "started_at": st.get("started_at"),
                    "finished_at": st.get("finished_at")},
        "1_general_information": {
            "1.1_provider_identification": {
                "provider_name_and_contact": _provider("the provider's name and contact details"),
                "authorised_representative": _provider("the authorised representative's name and contact details, if any"),
            },
            "1.2_model_identification": {
                "versioned_model_names": _provider("the versioned name(s) of the model(s) trained on this data"),
                "model_dependencies": _provider("the general-purpose AI model this one modifies or fine-tunes, if any"),
                "date_of_placement_on_the_union_market": _provider("the date the model was placed on the Union market"),
            },
            "1.3_modalities_size_and_characteristics": {
                "modalities": ["image", "text"],
                "this_dataset": {"images": facts.kept, "captions": facts.kept, "image_formats_downloaded": formats,
                                 "image_bytes_stored": facts.image_bytes},
                "training_data_size_range": _provider("the template's size range per modality, for all training data "
                                                      "(this dataset is one part of it)"),
                "types_of_content": ("photographs, illustrations and other images published on the web, each paired with "
                                     "the alt-text caption the input metadata gives it"),
                "latest_date_of_data_collection": st.get("finished_at"),
                "linguistic_characteristics": (
                    {"languages_declared": language, "note": "the captions' languages as declared for the card; kiln "
                                                             "does not detect languages"} if language else
                    {"languages_declared": None, "note": "not recorded: kiln does not detect the captions' languages"}),
                "other_characteristics": _provider("other relevant characteristics of all training data, if any"),
            },
        },
        "2_list_of_data_sources": {
            "2.1_publicly_available_datasets": {
                "input_metadata_files": [{"path": f.get("path"), "rows": f.get("rows"), "bytes": f.get("bytes")} for f in files],
                "note": ("the image URLs and captions came from these metadata files; if they are (part of) a publicly "
                         "available dataset (LAION-400M, DataComp, COYO, CC12M, ...), the provider names it here"),
                "other_publicly_available_datasets": _provider("every other publicly available dataset used for training"),
            },
            "2.2_private_non_publicly_available_datasets": {
                "commercially_licensed_by_rightsholders": _provider("datasets licensed from rightsholders or their representatives"),
                "other_private_datasets_from_third_parties": _provider("other private datasets obtained from third parties"),
            },
            "2.3_data_crawled_and_scraped_from_online_sources": {
                "crawlers_used": True,
                "crawler": crawler,
                "purpose": ("download the images at the URLs listed in the input metadata, to build an image-caption "
                            "dataset for training text-to-image models"),
                "behaviour": crawler_behaviour(facts),
                "collection_period": collection_period(st),
                "content_description": {
                    "types": "images (downloaded) with alt-text captions (from the input metadata)",
                    "formats_downloaded": formats,
                    "kept_samples": facts.kept,
                    "sources": f"{len(facts.domains):,} distinct domains (host of the URL column without its port, www. folded, as the card counts them) among the kept samples",
                },
                "top_domains_by_bytes": top_domains(facts),
                "other_crawled_sources": _provider("any other data the provider crawled or scraped for training"),
            },
            "2.4_user_data": _provider("data from user interactions with the model or from the provider's other services, if used"),
            "2.5_synthetic_data": _provider("synthetic data used for training, and the models that generated it, if any"),
            "2.6_other_sources": _provider("any other source of training data"),
        },
        "3_data_processing_aspects": {
            "3.1_respect_of_reservation_of_rights": {
                "code_of_practice_signatory": _provider("whether the provider signed the General-Purpose AI Code of Practice"),
                "recorded": protocols is not None,
                "protocols": protocols if protocols is not None else None,
                "not_recorded_why": None if protocols is not None else (
                    "stats.json has no consent record (a run before kiln recorded one); only X-Robots-Tag directives "
                    "were honoured by kiln then: " + json.dumps(_legacy_directives(facts))),
                "measures": reservation_measures(facts, protocols),
                "other_measures": _provider("measures taken for the rest of the training data, and any opt-out "
                                            "requests received and honoured outside this run"),
            },
            "3.2_removal_of_illegal_content": {
                "blocklists": blocklists,
                "safety_filters": [f for f in filters if f["kind"] == "safety"],
                "what_kiln_does_not_do": not_done(facts),
                "other_measures": _provider("other measures against illegal content (e.g. CSAM hash-matching services, "
                                            "applied before training)"),
            },
            "3.3_other_information": {
                "quality_filters": [f for f in filters if f["kind"] == "quality"],
                "funnel": funnel,
                "rejected_rows": facts.rejected,
                "note": "every removed row is in rejects/ with its stage, reason and detail",
            },
        },
        "provider_must_complete": provider_checklist(),
    })
    return out


def _legacy_directives(facts: Facts) -> dict:
    dl = facts.reasons.get("download", {})
    return {r: n for r, n in sorted(dl.items()) if r.startswith("robots_")}


def crawler_behaviour(facts: Facts) -> list[str]:
    """What kiln's fetcher does, as the run's settings say (no claim the run cannot back)."""
    flags = facts.stats.get("flags", {})
    consent = consent_of(facts.stats) or {}
    protocols = consent.get("protocols") or {}
    allowed = flags.get("allow_hosts")
    out = [
        "fetches only the URLs listed in the input metadata (and, once per origin, /robots.txt and "
        "/.well-known/tdmrep.json when those protocols are on): it follows no links and discovers no pages",
        f"http and https only; every redirect re-checked, at most {flags.get('max_redirects')}; no private, loopback, "
        "link-local or metadata addresses" + (f" (except those --allow-hosts allowed: {allowed})" if allowed else ""),
        "plain GET requests that identify the crawler in the User-Agent header; no cookies, credentials or logins, "
        "so nothing behind a paywall or login is fetched, and no CAPTCHA is solved",
        f"at most {flags.get('max_bytes')} bytes and {flags.get('download_timeout')} s per URL, "
        f"{flags.get('retries')} retries on 429/5xx honouring Retry-After, at most {flags.get('per_host_concurrency')} "
        "concurrent requests per host",
    ]
    if consent:
        for name in PROTOCOLS:
            p = protocols.get(name) or {}
            out.append(f"{PROTOCOL_TITLES[name]}: {'honoured' if p.get('enabled') else 'NOT honoured (switched off for this run)'}")
    else:
        out.append("X-Robots-Tag opt-outs honoured; robots.txt, TDMRep and other opt-out protocols were not read "
                   "(a run before kiln supported them)")
    return out


def reservation_measures(facts: Facts, protocols: list[dict] | None) -> list[str]:
    if protocols is None:
        return ["kiln honoured X-Robots-Tag directives only; a reservation of rights expressed in robots.txt, "
                "TDMRep or elsewhere was not honoured in this run"]
    consent = consent_of(facts.stats) or {}
    out = []
    for p in protocols:
        if not p["enabled"]:
            out.append(f"{p['title']}: switched off for this run; a reservation expressed only this way was not honoured")
            continue
        line = f"{p['title']}: honoured, {p['rows_removed']:,} rows removed"
        if p["protocol"] == "robots_txt":
            line += (f"; rules of {p.get('origins_consulted') or 0:,} origin(s) consulted, {p.get('origins_unavailable') or 0:,} "
                     f"could not be fetched ({p.get('on_unavailable_means') or p.get('on_unavailable')}); kiln obeys the group "
                     f"for its token `{consent.get('user_agent_token')}`, else `*`, and reads a disallow for any of "
                     f"{', '.join(p['settings'].get('ai_tokens') or [])} as a training opt-out")
        elif p["protocol"] == "tdmrep":
            line += (f"; /.well-known/tdmrep.json of {p.get('origins_consulted') or 0:,} origin(s) consulted, "
                     f"{p.get('origins_unavailable') or 0:,} could not be read ({p.get('on_unavailable_means') or p.get('on_unavailable')}); "
                     "the tdm-reservation response header is honoured too")
        elif p["protocol"] == "x_robots_tag":
            line += f"; directives {', '.join(p['settings'].get('directives') or [])}"
        elif p["protocol"] == "optout_list":
            files = p["settings"].get("files") or []
            line += f"; {len(files)} list file(s): " + ", ".join(
                f"{f.get('path')} (sha256 {str(f.get('sha256'))[:12]}, {f.get('domains')} domains, {f.get('prefixes')} URL prefixes)"
                for f in files) if files else "; no list file given"
        elif p["protocol"] == "c2pa":
            line += f"; manifests read with {p['settings'].get('reader') or 'an unrecorded reader'}"
        out.append(line)
    out.append("opt-outs are checked when the run fetches: a reservation made after the run, or one the site's rules "
               "did not express at that time, is not reflected")
    return out


def not_done(facts: Facts) -> list[str]:
    blocklists = blocklist_entries(facts) or {"lists": []}
    image_kinds = {k for b in blocklists["lists"] for k, n in (b.get("entries") or {}).items()
                   if n and k in ("image_sha256", "image_md5", "pdq")}
    out = []
    if not image_kinds:
        out.append("no image hash list (e.g. of known child sexual abuse material) was applied in this run: the "
                   "provider must screen the images with a hash-matching service before training")
    else:
        out.append(f"images were matched only against the lists above ({', '.join(sorted(image_kinds))}); kiln runs no "
                   "classifier for child sexual abuse material and no PhotoDNA-style service")
    out += [
        "no detection or removal of personal data (faces, names, documents) in images or captions",
        "no check of copyright or licence status beyond the opt-out protocols above; the LICENSE column, where "
        "present, is the source metadata's claim",
        "the safety filters are classifiers with error rates: they reduce, not remove, harmful content",
    ]
    return out


def provider_checklist() -> list[str]:
    return [
        "1.1 provider name and contact details; authorised representative",
        "1.2 versioned model name(s), model dependencies, date of placement on the Union market",
        "1.3 size range per modality and characteristics of ALL training data, not just this dataset",
        "2.1 the name of the public dataset the input metadata came from, and every other public dataset",
        "2.2 licensed and other private datasets",
        "2.3 other crawled or scraped data",
        "2.4 user data; 2.5 synthetic data; 2.6 other sources",
        "3.1 Code of Practice signatory status; measures for all other data; opt-out requests received",
        "3.2 other measures against illegal content (hash-matching of images before training)",
    ]


# -- the Markdown ---------------------------------------------------------------------------------


def _cell(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else ("-" if value is None else str(value))
    return text.replace("|", "\\|").replace("\n", " ") or '""'


def _num(n) -> str:
    return "-" if n is None else f"{n:,}"


def _filter_line(f: dict, prefix: str = "") -> str:
    if f["mode"] == "off":
        return f"- {prefix}{f['title']}: not run (`--{f['stage']} off`), nothing removed."
    line = (f"- {prefix}{f['title']}: mode `{f['mode']}`, threshold `{f['threshold_flag']} {f['threshold']}` (reject "
            f"{f['rejects']}), model `{_cell(f['model'])}`" + (f" (sha256 `{f['model_sha256']}`)" if f["model_sha256"] else ""))
    if f["mode"] != "filter":
        return line + "; scores recorded in the meta column `" + f["score_column"] + "`, no row removed by it."
    return line + f"; {f['rows_removed']:,} rows removed" + (
        f" (and {f['rows_removed_by_scoring_errors']:,} it could not score)" if f["rows_removed_by_scoring_errors"] else "") + "."


def render_summary(data: dict, marker_line: str | None = None) -> str:
    """training_summary.md from training_summary.json's object: the same numbers, for people."""
    g = data["1_general_information"]
    s = data["2_list_of_data_sources"]
    crawl = s["2.3_data_crawled_and_scraped_from_online_sources"]
    p = data["3_data_processing_aspects"]
    d = data["dataset"]
    fill = f"**[{PROVIDER.upper()}]**"
    out = []
    if marker_line:
        out += [marker_line, ""]
    out += [
        "# Public summary of training content — draft for the provider\n",
        f"Following the {TEMPLATE}. **This is a draft**: kiln filled in what it knows about one dataset it prepared "
        f"(kiln {d['kiln_version']}, commit `{d['git_commit'] or 'unknown'}`, configuration `{d['config_fingerprint']}`: "
        f"{d['input_rows']:,} input rows, {d['kept']:,} kept, {d['rejected']:,} rejected). Every entry marked {fill} is "
        "for the provider, who also adds every other source of training data before publishing. "
        "`training_summary.json` beside this file carries the same numbers machine-readably.\n",
        *_derived_lines(data.get("derived_from")),
        "## 1. General information\n",
        "### 1.1 Provider identification\n",
        f"- Provider name and contact details: {fill}",
        f"- Authorised representative: {fill}\n",
        "### 1.2 Model identification\n",
        f"- Versioned model name(s): {fill}",
        f"- Model dependencies (the model this one modifies or fine-tunes, if any): {fill}",
        f"- Date of placement on the Union market: {fill}\n",
        "### 1.3 Modalities, overall training data size and other characteristics\n",
    ]
    m = g["1.3_modalities_size_and_characteristics"]
    ling = m["linguistic_characteristics"]
    out += [
        f"- Modalities of this dataset: {', '.join(m['modalities'])} ({m['this_dataset']['images']:,} images, each with "
        "one caption).",
        f"- Training data size per modality (the template's ranges, for all training data): {fill}",
        f"- Types of content: {m['types_of_content']}.",
        f"- Latest date of data collection in this dataset: {m['latest_date_of_data_collection']}.",
        "- Linguistic characteristics: " + (f"declared as {', '.join(ling['languages_declared'])}; {ling['note']}."
                                            if ling["languages_declared"] else f"{ling['note']}.") + f" {fill}",
        f"- Other relevant characteristics: {fill}\n",
        "## 2. List of data sources\n",
        "### 2.1 Publicly available datasets\n",
        "The image URLs and captions came from these input metadata files:\n",
    ]
    pub = s["2.1_publicly_available_datasets"]
    for f in pub["input_metadata_files"][:50]:
        out.append(f"- `{_cell(f['path'])}`: {_num(f['rows'])} rows")
    if len(pub["input_metadata_files"]) > 50:
        out.append(f"- ... and {len(pub['input_metadata_files']) - 50} more (all in training_summary.json)")
    out += [
        "",
        f"If they are (part of) a publicly available dataset, name it: {fill}. Other publicly available datasets: {fill}\n",
        "### 2.2 Private non-publicly available datasets obtained from third parties\n",
        f"- Datasets commercially licensed by rightsholders or their representatives: {fill}",
        f"- Other private datasets obtained from third parties: {fill}\n",
        "### 2.3 Data crawled and scraped from online sources\n",
    ]
    c = crawl["crawler"]
    period = crawl["collection_period"]
    out += [
        "- Crawlers used: yes.",
        f"- Crawler: kiln {c['version'] or ''}".rstrip() + ", User-Agent "
        + (f"`{c['user_agent']}`" if c["user_agent"] else "not recorded by this run")
        + f" (robots.txt token `{c['user_agent_token']}`).",
        f"- Purpose: {crawl['purpose']}.",
        "- Behaviour: " + "; ".join(crawl["behaviour"]) + ".",
        f"- Period of data collection: {period['start'] or 'unknown'} to {period['end'] or 'unknown'} — {period['basis']}.",
        f"- Content: {crawl['content_description']['types']}; formats downloaded: "
        + (", ".join(f"{k} {_num(n)}" for k, n in crawl["content_description"]["formats_downloaded"].items()) or "none")
        + f"; {crawl['content_description']['sources']}.",
        f"- Other crawled or scraped data: {fill}\n",
    ]
    top = crawl["top_domains_by_bytes"]
    out.append(f"#### Domain names making up the top {TOP_DOMAIN_SHARE}% by size of content\n")
    if not top["recorded"]:
        out.append(f"Bytes per domain: {top['why']}.\n")
    else:
        missing = (f" {top['rows_without_bytes']:,} kept rows have no source_bytes value and are not counted."
                   if top["rows_without_bytes"] else "")
        out += [
            f"The top {top['percent_of_domains']}% of the {top['domains_total']:,} domain names (hosts) of the kept samples, "
            f"ranked by bytes downloaded: {top['domains_listed']:,} domain(s) holding {_num(top['bytes_listed'])} of "
            f"{_num(top['bytes_total'])} bytes ({pct(top['bytes_listed'], top['bytes_total'])}). Basis: {top['basis']}.{missing}\n",
            "| # | domain | bytes | share of all kept bytes |\n| ---: | --- | ---: | ---: |",
        ]
        for i, row in enumerate(top["domains"], 1):
            out.append(f"| {i} | {_cell(row['domain'])} | {row['bytes']:,} | {100 * row['share']:.2f}% |")
        out.append("")
    out += [
        "### 2.4 User data\n", f"{fill}\n",
        "### 2.5 Synthetic data\n", f"{fill}\n",
        "### 2.6 Other sources of data\n", f"{fill}\n",
        "## 3. Data processing aspects\n",
        "### 3.1 Respect of reservation of rights from the text and data mining exception or limitation\n",
        f"- Signatory of the General-Purpose AI Code of Practice: {fill}",
    ]
    r = p["3.1_respect_of_reservation_of_rights"]
    for line in r["measures"]:
        out.append(f"- {line}.")
    out.append(f"- Measures for the rest of the training data, and opt-out requests received and honoured: {fill}\n")
    if r["protocols"] is not None:
        out += ["| protocol | honoured | rows removed | origins consulted | origins whose rules could not be fetched | then |",
                "| --- | --- | ---: | ---: | ---: | --- |"]
        for pr in r["protocols"]:
            consulted = pr.get("origins_consulted")
            out.append(f"| {pr['title']} | {'yes' if pr['enabled'] else 'no'} | {pr['rows_removed']:,} | "
                       f"{_num(consulted) if 'origins_consulted' in pr else 'n/a'} | "
                       f"{_num(pr.get('origins_unavailable')) if 'origins_unavailable' in pr else 'n/a'} | "
                       f"{_cell(pr.get('on_unavailable_means')) if 'on_unavailable' in pr else 'n/a'} |")
        out.append("")
    else:
        out.append(f"*{r['not_recorded_why']}*\n")
    ill = p["3.2_removal_of_illegal_content"]
    out.append("### 3.2 Removal of illegal content\n")
    bl = ill["blocklists"]
    if bl is None:
        out.append("- Blocklists: not recorded (a run before kiln recorded its consent and blocklist settings).")
    elif not bl["lists"]:
        out.append("- Blocklists: none applied (`--blocklist` not given).")
    else:
        out.append(f"- Blocklists applied: {len(bl['lists'])}, {bl['rows_removed']:,} rows removed in all.\n")
        out += ["| list | sha256 | entries per kind | rows removed per reason |", "| --- | --- | --- | --- |"]
        for b in bl["lists"]:
            out.append(f"| {_cell(b['name'])} | `{str(b['sha256'])[:16]}` | "
                       + (", ".join(f"{k} {_num(n)}" for k, n in sorted(b["entries"].items())) or "-") + " | "
                       + (", ".join(f"{k} {_num(n)}" for k, n in b["rows_removed_by_reason"].items()) or "0") + " |")
        out.append("")
    for f in ill["safety_filters"]:
        out.append(_filter_line(f))
    for line in ill["what_kiln_does_not_do"]:
        out.append(f"- Not done: {line}.")
    out.append(f"- Other measures against illegal content: {fill}\n")
    other = p["3.3_other_information"]
    out += ["### 3.3 Other information\n"]
    for f in other["quality_filters"]:
        out.append(_filter_line(f, "Quality filter — "))
    out += ["", "| stage | mode | in | out | rejected |", "| --- | --- | ---: | ---: | ---: |"]
    for f in other["funnel"]:
        out.append(f"| {f['stage']} | {f['mode']} | {f['in']:,} | {f['out']:,} | {f['rejected']:,} |")
    out += ["", "Every removed row is in `rejects/` with its stage, reason and detail.\n",
            "## What the provider must add\n", *(f"- {item}" for item in data["provider_must_complete"]), ""]
    return "\n".join(out)


def _derived_lines(derived: dict | None) -> list[str]:
    """training_summary.md's note that the dataset is a `kiln subset` of another (its parent's content
    is where the crawl below happened; the subset downloaded nothing)."""
    if not derived:
        return []
    p = derived["parent"]
    return [f"**Derived dataset.** This dataset is a subset (`kiln subset`, offline: nothing was downloaded) of the kiln "
            f"dataset `{p.get('path')}` (configuration `{p.get('config_fingerprint')}`, {p.get('kept') or 0:,} samples), "
            f"selected by {len(derived['rules'])} rule(s) recorded in `training_summary.json` → `derived_from`. The crawl "
            "described below is the parent's.\n"]
