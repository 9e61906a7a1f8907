"""The card's Markdown body, one function per section of *Datasheets for Datasets* (Gebru et al.,
2021): Motivation, Composition, Collection process, Preprocessing and filtering, Uses,
Distribution, Maintenance, then the known limitations and the references.

Each section function takes the Facts (and what else it shows) and returns its lines; `render`
joins them. Nothing here reads files: every number comes from pipeline.card.facts.
"""

from __future__ import annotations

import json
import shlex

from pipeline.card.facts import SAMPLE_MAX_TOXICITY, SCORES, Facts, FloatHist, pct
from pipeline.card.hub import hub_licence, licence_metadata
from pipeline.card.summary import blocklist_entries, consent_of, derivation, opt_out_protocols


def render(facts: Facts, plots: dict[str, str | None], pretty_name: str, seed: int, language: list[str] | None) -> str:
    """The card's Markdown body (without the YAML block). `plots`: name -> relative path, or the
    reason the plot was skipped."""
    lines = [
        *intro(facts, pretty_name),
        *derived_from(facts),
        *motivation(facts),
        *composition(facts, plots, seed, language),
        *collection_process(facts),
        *preprocessing(facts, plots),
        *uses(),
        *distribution(facts),
        *maintenance(facts),
        *limitations(facts),
        *references(),
    ]
    return "\n".join(lines).rstrip() + "\n"


# -- formatting ------------------------------------------------------------------------------------


def md(value) -> str:
    """A value for a Markdown table cell: str() as given (so numbers read as in stats.json)."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    if text == "":
        return '""'
    return text.replace("|", "\\|").replace("\n", " ")


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def plot_ref(plots: dict[str, str | None], name: str, alt: str) -> str:
    """The plot's image link, or why it was skipped."""
    ref = plots.get(name)
    if ref and ref.endswith(".png"):
        return f"![{alt}]({ref})\n"
    return f"*Plot skipped: {ref or 'no data'}.*\n"


def score_summary(h: FloatHist, series: str = "kept") -> str:
    if not h.n(series):
        return "no values"
    return (f"n={h.n(series):,}, mean {fmt(h.mean(series))}, median ≈ {fmt(h.quantile(series, 0.5), 3)}, "
            f"5th–95th percentile ≈ {fmt(h.quantile(series, 0.05), 3)}–{fmt(h.quantile(series, 0.95), 3)}, "
            f"min {fmt(h.min[series])}, max {fmt(h.max[series])}")


# -- the sections ----------------------------------------------------------------------------------


def intro(facts: Facts, pretty_name: str) -> list[str]:
    st, n_in, kept, rej = facts.stats, facts.input_rows, facts.kept, facts.rejected
    return [
        f"# {pretty_name}\n",
        f"Image–caption pairs prepared by kiln `{st.get('kiln_version')}` "
        f"(commit `{st.get('git_commit') or 'unknown'}`) from {n_in:,} input rows of web metadata: "
        f"**{kept:,} kept ({pct(kept, n_in)})**, {rej:,} rejected, each with a stage and a reason. "
        f"The run started {st.get('started_at')} and finished {st.get('finished_at')} "
        f"({st.get('duration_s')} s). `stats.json` beside this card is its machine-readable twin; "
        f"the file layout is kiln's SHARDS.md (webdataset tars + Parquet).\n",
        "This card follows *Datasheets for Datasets* (Gebru et al., 2021). Its numbers were recounted "
        "from the shard, metadata and rejects files when the card was written and checked against "
        "`stats.json` and `manifest.json`.\n",
    ]


def derived_from(facts: Facts) -> list[str]:
    """A `kiln subset` child: its parent (path, fingerprint, card), the rules in the order they
    applied, and the funnel from the parent's input rows to this dataset. Nothing for kiln prepare's."""
    d = derivation(facts.stats)
    if d is None:
        return []
    p = d["parent"]
    out = ["## Derived from a parent dataset\n",
           f"This dataset is a subset of the kiln dataset `{md(p.get('path'))}` (configuration fingerprint "
           f"`{md(p.get('config_fingerprint'))}`, manifest sha256 `{md(p.get('manifest_sha256'))}`, card sha256 "
           f"`{md(p.get('card_sha256') or 'no card')}`), made by `kiln subset` without any network access: kept samples "
           "are the parent's bytes (images, captions, metadata, T5 arrays), copied unchanged. Every parent sample is "
           "either kept here or a row of `rejects/` with stage `subset` and the rule that removed it. The sections below "
           "on collection and filtering describe how the parent was made.\n"]
    if d.get("grandparent"):
        out.append(f"The parent is itself a subset of `{md(d['grandparent'])}`.\n")
    out.append("**Rules, in the order they applied** (the first that fails names the reject reason; a `--where` "
               "condition that is null counts as false):\n")
    out.append("| # | rule | reject reason | settings |\n| ---: | --- | --- | --- |")
    for i, r in enumerate(d["rules"], 1):
        rest = {k: v for k, v in r.items() if k not in ("rule", "reasons")}
        out.append(f"| {i} | {md(r.get('rule'))} | `{md(r.get('reasons'))}` | {md(rest)} |")
    if not d["rules"]:
        out.append("| - | none: every parent sample kept | - | - |")
    out.append("")
    for w in d.get("warnings") or []:
        out.append(f"- **Note:** {md(w)}")
    out.append("**Funnel from the parent's input** (the parent's stages, then this subset):\n")
    out.append("| stage | in | out | rejected | reasons |\n| --- | ---: | ---: | ---: | --- |")
    for f in d["funnel"]:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted((f.get("reasons") or {}).items(), key=lambda kv: -kv[1]))
        out.append(f"| {md(f.get('stage'))} | {f.get('in', 0):,} | {f.get('out', 0):,} | {f.get('rejected', 0):,} | {md(reasons or '-')} |")
    out.append("")
    return out


def motivation(facts: Facts) -> list[str]:
    modes = facts.stats.get("stage_modes", {})
    return [
        "## Motivation\n",
        "- **Purpose.** Training data for text-to-image diffusion models in the style of Imagen "
        "(Saharia et al., 2022): images with their alt-text captions, "
        + ("and each caption's frozen T5 text-encoder embedding precomputed (so a trainer never loads the encoder)."
           if modes.get("t5") == "embed" else "without precomputed text embeddings (`--t5 off`).")
        + "\n- **Who created it, and who funded it:** not recorded by the run; the person publishing "
        "this card should add it here.\n- **Source.** The input metadata files listed under "
        "*Collection process*; their rows point at images on the public web that kiln downloaded.\n",
    ]


def t5_where(flags: dict) -> str:
    """Where `kiln prepare --t5-store/--t5-dtype` put the T5 arrays (runs before issue 14: KEY.t5.npy + meta)."""
    store, dtype = flags.get("t5_store", "both"), flags.get("t5_dtype", "float16")
    member = {"float16": "`KEY.t5.npy`, float16", "bfloat16": "`KEY.t5.bf16`, raw bfloat16",
              "float8": "`KEY.t5.f8`, float8_e4m3fn x `t5_scale`"}.get(dtype, f"{dtype}")
    column = "the meta parquet's `t5` column" + ("" if dtype == "float16" else f" ({dtype})")
    return {"tar": member, "meta": column, "both": f"{member}; also {column}"}.get(store, member)


def composition(facts: Facts, plots: dict[str, str | None], seed: int, language: list[str] | None) -> list[str]:
    flags, modes, models = facts.stats.get("flags", {}), facts.stats.get("stage_modes", {}), facts.stats.get("models", {})
    kept, rej = facts.kept, facts.rejected
    out = ["## Composition\n"]
    out.append(
        f"- **Instances:** {kept:,} image–caption pairs in {len(facts.shards):,} shard(s). Each sample has "
        "a stored image (`KEY.jpg`/`.png`/`.webp`), its caption (`KEY.txt`), its metadata (`KEY.json`: "
        "every input column plus kiln's scores, sizes, hashes and provenance)"
        + (f", and its T5 embedding ({t5_where(flags)})" if modes.get("t5") == "embed" else "")
        + ". `meta/NNNNNN.parquet` holds the same metadata one row per sample; `rejects/NNNNNN.parquet` "
        f"holds the {rej:,} rejected input rows with their stage, reason and scores.\n"
        f"- **Size on disk:** tars {facts.bytes_by_kind.get('shards', 0):,} bytes, meta parquet "
        f"{facts.bytes_by_kind.get('meta', 0):,} bytes, rejects parquet {facts.bytes_by_kind.get('rejects', 0):,} bytes; "
        f"stored images {facts.image_bytes:,} bytes in total"
        + (f" ({facts.image_bytes / kept / 1024:.1f} KiB per sample on average)" if kept else "") + ".\n"
        "- **Is it a sample?** It is what survived the filters below out of the input rows; the input "
        "itself is whatever metadata was given (for LAION-400M, a CLIP-filtered crawl of Common Crawl).\n"
        "- **Labels:** none beyond the found alt-text captions and the machine-generated scores.\n")
    if facts.formats:
        out.append("- **Source image formats:** " + ", ".join(f"{k} {n:,}" for k, n in sorted(facts.formats.items(), key=lambda kv: (-kv[1], kv[0]))) + ".\n")
    ss, sd = facts.shorter_side, facts.stored_side
    if ss.n:
        out.append(
            f"- **Image sizes:** downloaded images' shorter side median {ss.quantile(0.5)} px "
            f"(5th–95th percentile {ss.quantile(0.05)}–{ss.quantile(0.95)} px); samples at least 64 px: "
            f"{ss.at_least(64):,}, at least 256 px: {ss.at_least(256):,} ({pct(ss.at_least(256), kept)}), "
            f"at least 1024 px: {ss.at_least(1024):,} ({pct(ss.at_least(1024), kept)}). Stored images are "
            f"square at min(shorter side, --image-size {flags.get('image_size')}) px, never upscaled"
            + (" (upscaling was allowed in this run)" if flags.get("allow_upscale") else "")
            + f": stored side median {sd.quantile(0.5)} px.\n")
    out.append(plot_ref(plots, "image_sizes", "Original image sizes of kept samples"))
    cc = facts.caption_chars
    if cc.n:
        out.append(
            f"- **Captions:** {cc.n:,} captions, length median {cc.quantile(0.5)} characters "
            f"(5th–95th percentile {cc.quantile(0.05)}–{cc.quantile(0.95)}, max {cc.max}); the prefilter "
            f"kept {flags.get('min_caption_chars')}–{flags.get('max_caption_chars')} characters.\n")
    out.append(plot_ref(plots, "caption_chars", "Caption lengths in characters"))
    if facts.t5_len.n:
        t5m = models.get("t5", {})
        out.append(
            f"- **T5 embeddings:** {facts.t5_len.n:,} captions embedded, length median "
            f"{facts.t5_len.quantile(0.5)} tokens (5th–95th percentile {facts.t5_len.quantile(0.05)}–"
            f"{facts.t5_len.quantile(0.95)}, EOS included); {facts.t5_truncated:,} captions "
            f"({pct(facts.t5_truncated, kept)}) were cut at --t5-max-length {flags.get('t5_max_length')}. "
            f"Each embedding is float16 `[t5_len, {t5m.get('d_model')}]`, unpadded.\n")
    out.append(plot_ref(plots, "t5_len", "T5 token lengths"))
    return out + licence_table(facts) + domain_table(facts) + language_table(facts, language) + sample_grid(facts, plots, seed)


def licence_table(facts: Facts) -> list[str]:
    _, sentence = licence_metadata(facts)
    out = ["### Licences (LICENSE column of the kept rows)\n",
           sentence + " The LICENSE value is what the source metadata declares for the page or image; kiln did not verify it.\n"]
    if facts.has_license_column:
        out.append("| LICENSE value | Hub licence id | samples | share |\n| --- | --- | ---: | ---: |")
        for value, n in sorted(facts.licences.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            out.append(f"| `{md(value)}` | {hub_licence(value)} | {n:,} | {pct(n, facts.kept)} |")
        out.append("")
    return out


def domain_table(facts: Facts) -> list[str]:
    out = [f"### Top source domains (host of {facts.columns['url']}, kept rows)\n",
           "| domain | samples | share |\n| --- | ---: | ---: |"]
    for dom, n in sorted(facts.domains.items(), key=lambda kv: (-kv[1], kv[0]))[:10]:
        out.append(f"| {md(dom)} | {n:,} | {pct(n, facts.kept)} |")
    out.append(f"\n{len(facts.domains):,} distinct domains in all.\n")
    return out


def language_table(facts: Facts, language: list[str] | None) -> list[str]:
    if not facts.languages:
        return [f"**Language:** declared as {', '.join(language or ['en'])} by whoever wrote this card; the input has "
                "no LANGUAGE column and kiln does not detect languages.\n"]
    out = ["### Languages (LANGUAGE column of the kept rows)\n", "| language | samples | share |\n| --- | ---: | ---: |"]
    for code, n in sorted(facts.languages.items(), key=lambda kv: (-kv[1], str(kv[0])))[:10]:
        out.append(f"| {md(code)} | {n:,} | {pct(n, facts.kept)} |")
    out.append("")
    return out


def sample_grid(facts: Facts, plots: dict[str, str | None], seed: int) -> list[str]:
    out = ["### Samples\n"]
    if facts.samples:
        screen = (f"Only samples whose punsafe is at most {facts.max_sample_punsafe} and whose caption toxicity is at most {SAMPLE_MAX_TOXICITY} are eligible."
                  if facts.samples_screened else
                  "**These samples were not screened by an NSFW model (it was off for this run).**")
        out.append(f"{len(facts.samples)} kept samples, chosen by the smallest sha256(\"{seed}:uid\") — a seeded "
                   f"pseudo-random pick that is the same every time this card is written. {screen}\n")
    out.append(plot_ref(plots, "samples", "A grid of kept samples with their captions"))
    return out


def collection_process(facts: Facts) -> list[str]:
    st, flags, n_in = facts.stats, facts.stats.get("flags", {}), facts.input_rows
    files = st.get("input", {}).get("files", [])
    out = ["## Collection process\n", f"- **Input:** `{md(st.get('input', {}).get('pattern'))}`, {len(files)} file(s), {n_in:,} rows:"]
    for f in files[:20]:
        out.append(f"  - `{md(f.get('path'))}`: {f.get('rows'):,} rows, {f.get('bytes'):,} bytes")
    if len(files) > 20:
        out.append(f"  - ... and {len(files) - 20} more (all in stats.json)")
    out.append("")
    out.append(
        f"- **Download:** each URL fetched once by kiln's fetcher: http/https only; no private, "
        f"loopback, link-local or metadata addresses (allowed exceptions: `{md(flags.get('allow_hosts') or 'none')}`); "
        f"every redirect re-checked (at most {flags.get('max_redirects')}); at most {flags.get('max_bytes'):,} bytes "
        f"and {flags.get('download_timeout')} s per URL, {flags.get('retries')} retries on 429/5xx honouring "
        f"Retry-After; User-Agent token `{md(flags.get('user_agent_token'))}`.\n"
        f"- **When:** {_fetched(st)}. Web content changes: a later "
        "run over the same metadata downloads different bytes for some URLs (link rot, edits).\n")
    return out + opt_outs(facts) + how_the_job_ran(facts)


def _fetched(st: dict) -> str:
    """When the images were fetched: this run's start and end, or for a `kiln subset` child (which
    downloads nothing) the parent's collection period."""
    d = derivation(st)
    period = ((st.get("subset") or {}).get("parent") or {}).get("collection_period") if d else None
    if isinstance(period, dict):
        return f"{period.get('start') or 'unknown'} to {period.get('end')}, when the parent dataset was made (kiln subset downloads nothing)"
    return f"{st.get('started_at')} to {st.get('finished_at')}"


def opt_outs(facts: Facts) -> list[str]:
    """The opt-out table per protocol and the blocklist table (stats.json's consent record, rows
    removed recounted from the rejects); a run before that record gets the X-Robots-Tag table it had."""
    if consent_of(facts.stats) is None:
        return _opt_outs_before_consent(facts)
    consent, n_in = consent_of(facts.stats), facts.input_rows
    protocols = opt_out_protocols(facts)
    settings = {p["protocol"]: p["settings"] for p in protocols if p["enabled"]}
    ua, token = consent.get("user_agent"), consent.get("user_agent_token")
    out = [
        "### Opt-out handling\n",
        "kiln checks machine-readable reservations of rights before it keeps a sample, identifying itself as "
        + (f"`{md(ua)}`" if ua else "kiln") + f" (robots.txt token `{md(token)}`). Every row an opt-out removed is a "
        "row of `rejects/` with its stage and reason; the counts below are recounted from those files. A protocol "
        "switched off for this run was **not** honoured: an opt-out expressed only that way was ignored.\n",
        "| protocol | enabled | rows removed | share of input | origins consulted | origins whose rules could not be fetched | then |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in protocols:
        if "origins_consulted" in p:
            consulted, unavailable = f"{p.get('origins_consulted') or 0:,}", f"{p.get('origins_unavailable') or 0:,}"
            then = f"`{md(p.get('on_unavailable'))}`: {md(p.get('on_unavailable_means') or 'not recorded')}"
        else:
            consulted = unavailable = then = "n/a"
        out.append(f"| {md(p['title'])} | {'yes' if p['enabled'] else '**no**'} | {p['rows_removed']:,} | "
                   f"{pct(p['rows_removed'], n_in)} | {consulted} | {unavailable} | {then} |")
    out += ["", "| protocol | stage/reason | rows |\n| --- | --- | ---: |"]
    for p in protocols:
        for reason, n in p["rows_removed_by_reason"].items():
            out.append(f"| {p['protocol']} | `{md(reason)}` | {n:,} |")
    out.append("")
    robots = settings.get("robots_txt", {})
    if robots.get("ai_tokens"):
        out.append("robots.txt: kiln obeys the group naming its token, else `*`; a disallow in a group naming one of "
                   + ", ".join(f"`{md(t)}`" for t in robots["ai_tokens"]) + " is read as a training opt-out "
                   f"(`robotstxt_ai_optout`). {robots.get('origins_no_rules') or 0:,} origin(s) answered 4xx (no rules: "
                   "everything allowed, RFC 9309 §2.3.1.3).\n")
    directives = settings.get("x_robots_tag", {}).get("directives") or []
    if directives:
        out += _directive_table(facts, directives)
    files = settings.get("optout_list", {}).get("files") or []
    if files:
        out += ["| opt-out list | sha256 | domains | URL prefixes |\n| --- | --- | ---: | ---: |"]
        for f in files:
            out.append(f"| `{md(f.get('path'))}` | `{md(str(f.get('sha256'))[:16])}` | {f.get('domains') or 0:,} | {f.get('prefixes') or 0:,} |")
        out.append("")
    reader = settings.get("c2pa", {}).get("reader")
    if reader:
        out.append(f"C2PA manifests were read with {md(reader)}.\n")
    return out + blocklist_table(facts)


def blocklist_table(facts: Facts) -> list[str]:
    bl = blocklist_entries(facts)
    out = ["### Blocklists\n"]
    if not bl or not bl["lists"]:
        return out + ["No `--blocklist` was given: no sample ids, URL hashes, domains or image hashes were matched "
                      "against a list.\n"]
    out += ["| list | sha256 | entries per kind | rows removed per kind |\n| --- | --- | --- | --- |"]
    for b in bl["lists"]:
        entries = ", ".join(f"{md(k)} {n:,}" for k, n in sorted(b["entries"].items())) or "none"
        removed = ", ".join(f"{md(r[len('blocklist_'):] if r.startswith('blocklist_') else r)} {n:,}"
                            for r, n in b["rows_removed_by_reason"].items()) or "0"
        out.append(f"| {md(b['name'])} | `{md(str(b['sha256'])[:16])}` | {entries} | {removed} |")
    out.append(f"\n{bl['rows_removed']:,} rows removed by the lists together ("
               + (", ".join(f"`{md(r)}` {n:,}" for r, n in bl["rows_removed_by_reason"].items()) or "none") + "); "
               "a reject's detail names the list that matched (the first, in flag order), with the id or hash only."
               + (f" {bl['rows_not_attributed_to_a_list']:,} of them name no list of this run."
                  if bl["rows_not_attributed_to_a_list"] else "") + "\n")
    return out


def _directive_table(facts: Facts, directives: list[str]) -> list[str]:
    n_in = facts.input_rows
    dl = facts.reasons.get("download", {})
    out = ["| directive honoured | rows removed | share of input |\n| --- | ---: | ---: |"]
    for d in directives:
        n = dl.get(f"robots_{d}", 0)
        out.append(f"| `{md(d)}` | {n:,} | {pct(n, n_in)} |")
    extra = {r: n for r, n in dl.items() if r.startswith("robots_") and r[len("robots_"):] not in directives}
    for r, n in sorted(extra.items()):
        out.append(f"| `{md(r[len('robots_'):])}` | {n:,} | {pct(n, n_in)} |")
    out.append("")
    return out


def _opt_outs_before_consent(facts: Facts) -> list[str]:
    """A run before stats.json's consent record: X-Robots-Tag was all kiln honoured."""
    flags = facts.stats.get("flags", {})
    listed = flags.get("disallowed_directives") or ""  # a JSON list; a comma-separated string in older runs
    directives = [d.strip().lower() for d in (listed.split(",") if isinstance(listed, str) else listed) if d.strip()]
    return [
        "### Opt-out handling\n",
        "kiln honours `X-Robots-Tag` response headers, bare or scoped to its user-agent token "
        f"(`{md(flags.get('user_agent_token'))}: noai`); a header naming one of the directives below removes "
        "the row (`none` counts as `noindex`). It does not read robots.txt, TDM reservation protocols "
        "or other opt-out registries: an opt-out expressed only there was **not** honoured.\n",
        *_directive_table(facts, directives),
    ]


def how_the_job_ran(facts: Facts) -> list[str]:
    st = facts.stats
    beam_opts = st.get("beam_options") or {}
    runner = beam_opts.get("runner") or "DirectRunner (Beam's default)"
    out = [
        "### How the job ran\n",
        f"- **Runner:** {runner}; Beam options: "
        + (", ".join(f"`--{k}={md(v)}`" for k, v in sorted(beam_opts.items())) if beam_opts else "Beam's defaults")
        + ".\n- **Versions:** " + ", ".join(f"{k} {v}" for k, v in sorted(st.get("versions", {}).items()))
        + f".\n- **kiln:** {st.get('kiln_version')}, git commit `{st.get('git_commit') or 'unknown'}`, "
        f"configuration fingerprint `{st.get('config_fingerprint')}`.\n",
    ]
    this_run = st.get("this_run", {})
    busy = this_run.get("stage_busy_s") or {}
    if busy:
        out.append("- **Busy time per stage (summed over workers, this run):** " + ", ".join(f"{k} {v:,.1f} s" for k, v in sorted(busy.items())) + ".\n")
    if this_run.get("shards_skipped"):
        out.append(f"- This run resumed an earlier one: {this_run['shards_skipped']} complete shard(s) were kept from it.\n")
    return out


def preprocessing(facts: Facts, plots: dict[str, str | None]) -> list[str]:
    n_in, kept, rej = facts.input_rows, facts.kept, facts.rejected
    out = [
        "## Preprocessing and filtering\n",
        "Every input row ended in exactly one place: a shard, or the rejects table with a stage and a "
        f"reason. **{n_in:,} input rows = {kept:,} kept + {rej:,} rejected.** Stages run cheapest first; a "
        "stage in `score` mode records its scores and rejects nothing.\n",
        "### Funnel\n",
        "| stage | mode | in | out | rejected | % of input | % of stage input |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in facts.funnel:
        out.append(f"| {f['stage']} | {f['mode']} | {f['in']:,} | {f['out']:,} | {f['rejected']:,} | {pct(f['rejected'], n_in)} | {pct(f['rejected'], f['in'])} |")
    out.append(f"| **kept** | | {n_in:,} | {kept:,} | {rej:,} | {pct(kept, n_in)} kept | |\n")
    out += ["### Reject reasons\n", "| stage | reason | rows | % of input |\n| --- | --- | ---: | ---: |"]
    for f in facts.funnel:
        for reason, n in sorted(f["reasons"].items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"| {f['stage']} | {reason} | {n:,} | {pct(n, n_in)} |")
    out.append("")
    return out + model_filters(facts, plots) + run_flags(facts) + models_used(facts)


def model_filters(facts: Facts, plots: dict[str, str | None]) -> list[str]:
    flags, modes = facts.stats.get("flags", {}), facts.stats.get("stage_modes", {})
    out = ["### Model filters and their score distributions\n"]
    for score in SCORES:
        mode = modes.get(score.stage, "off")
        out.append(f"- **{score.title}** — mode `{mode}`, threshold `--{score.threshold_flag.replace('_', '-')} "
                   f"{flags.get(score.threshold_flag)}` (reject {score.rejects}"
                   + ("" if mode == "filter" else "; not applied in this mode") + f"). Kept: {score_summary(facts.scores[score.column])}.")
    out.append("")
    for score in SCORES:
        out.append(plot_ref(plots, score.column, f"{score.title} distribution with its threshold"))
    return out


def run_flags(facts: Facts) -> list[str]:
    """Every flag, the stage modes, and the command that reproduces the run."""
    st = facts.stats
    flags, modes = st.get("flags", {}), st.get("stage_modes", {})
    out = ["### Every flag of the run\n", "| flag | value |\n| --- | --- |"]
    for k, v in sorted(flags.items()):
        out.append(f"| `--{k.replace('_', '-')}` | `{md(v)}` |")
    out.append("")
    out.append("Stage modes: " + ", ".join(f"{k} `{v}`" for k, v in modes.items()) + ".\n")
    if st.get("command"):
        out.append("To reproduce (same input files, same models, same kiln commit):\n")
        out.append("```\n" + st["command"] + "\n```\n")
    else:
        beam_opts = st.get("beam_options") or {}
        out.append("To reproduce (same input files, same models, same kiln commit) — **rebuilt from the flags in "
                   "stats.json**: this run predates the exact command that newer runs record, so check it before use:\n")
        out.append("```\n" + reconstructed_command(flags)
                   + (" " + " ".join(f"--{k}={v}" for k, v in sorted(beam_opts.items())) if beam_opts else "") + "\n```\n")
    return out


def reconstructed_command(flags: dict) -> str:
    """A `kiln prepare` command line rebuilt from stats.json's flags (--input, --output, then those
    off their defaults, in --help order), for datasets written before stats.json recorded `command`."""
    from pipeline.config import SETTINGS

    words = ["kiln", "prepare"]
    for key, s in SETTINGS.items():
        if key not in flags or key in ("quiet", "overwrite"):  # how the run behaved, not what it produced
            continue
        value = flags[key]
        if s.type is tuple and value is not None:  # a list in JSON; older runs kept the comma-separated string
            value = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
        if not s.required and value == s.default:
            continue
        if value is None:  # unset in that run (e.g. no NSFW head before kiln had a default one): no flag spells it
            continue
        if s.type is bool:
            words.append(s.flag)
        else:
            words += [s.flag, shlex.quote(",".join(value) if s.type is tuple else str(value))]
    return " ".join(words)


def models_used(facts: Facts) -> list[str]:
    used = facts.stats.get("models", {})
    out = ["### Models\n"]
    if not used:
        out.append("No models were used (every model stage was off).\n")
    for name, info in sorted(used.items()):
        out.append(f"- **{name}**: sha256 `{info.get('sha256')}`")
        for k, v in sorted(info.items()):
            if k not in ("sha256", "provenance"):
                out.append(f"  - {k}: `{md(v)}`")
        out += _provenance(info.get("provenance"))
    out.append("")
    return out


def _provenance(prov) -> list[str]:
    """Where a model came from, as the resolver recorded it (pipeline.models.resolve): the flag's
    value, the registry name, the licence, the source, every file's sha256 from models.json."""
    if not isinstance(prov, dict):
        return []
    out = [f"  - given as: `{md(prov.get('spec'))}`" + (f" (kiln registry: `{md(prov['name'])}`)" if prov.get("name") else "")]
    if prov.get("license"):
        out.append(f"  - licence: {md(prov['license'])}")
    src = prov.get("source")
    if isinstance(src, dict):
        where = (f"{src.get('repo')}@{src.get('revision')}" if src.get("kind") == "hub"
                 else ", ".join(map(str, src.get("urls") or [])))
        out.append(f"  - source: `{md(where)}`")
    files = prov.get("files")
    if isinstance(files, dict) and files:
        out.append("  - files (sha256, from the models folder's models.json): "
                   + ", ".join(f"`{md(f)}` `{md(h)}`" for f, h in sorted(files.items())))
    return out


def uses_items() -> list[str]:
    """The intended and unsuitable uses (the card's Uses section; croissant.json's rai:dataUseCases)."""
    return [
        "**Intended:** training and evaluating text-to-image models (a cascaded diffusion model: the "
        "64 px base stage on every sample, super-resolution stages only on samples at least as large as "
        "their output), and research on data filtering, using the per-sample scores to re-threshold.",
        "**Not suitable for:** identifying or profiling people; any use that needs the consent of the "
        "people depicted or a cleared copyright status; measuring demographic fairness (the composition "
        "is unknown, see below); use as a safety-vetted or child-safe image set; applications that need "
        "captions to be accurate descriptions (alt-text is often not).",
        "**Before use,** read the limitations below and check your jurisdiction's rules on text and "
        "data mining and on the images' licences.",
    ]


def uses() -> list[str]:
    return ["## Uses\n", "\n".join(f"- {item}" for item in uses_items()) + "\n"]


def distribution(facts: Facts) -> list[str]:
    _, lic_sentence = licence_metadata(facts)
    return [
        "## Distribution\n",
        f"- **Format:** {len(facts.shards):,} webdataset tar shard(s) with Parquet metadata and rejects, "
        "`manifest.json` with every shard's sha256 and sample count, `stats.json`, this card and its "
        "plots. The Hub's default config reads `shards/*.tar` as webdataset.\n"
        f"- **Licence:** {lic_sentence} Images remain the property of their rights holders; the "
        "LICENSE column is not a grant from them.\n"
        "- **Takedown:** a sample is removed by deleting its rows and tar members and rewriting its "
        "shard's files and the manifest; the `uid` (sha256 of URL and caption) identifies it.\n",
    ]


def maintenance(facts: Facts) -> list[str]:
    return [
        "## Maintenance\n",
        "- **Reproducibility:** re-running the command above over the same input files with the same "
        "models gives byte-identical shards for every URL whose bytes did not change (shards are uid "
        "ranges, tar members are sorted with fixed mtimes, the manifest has no timestamps). "
        f"This dataset's configuration fingerprint is `{facts.stats.get('config_fingerprint')}`.\n"
        "- **Updates and contact:** not recorded by the run; the publisher should state who maintains "
        "the copy and how to report problems or request removal.\n"
        "- **Regenerate this card:** `kiln card DATASET_DIR` (it re-checks the files first).\n",
    ]


def limitation_items(facts: Facts) -> tuple[list[str], list[str]]:
    """(biases, limitations) of the filters this run used and of the data, in the card's order when
    joined; croissant.json's rai:dataBiases and rai:dataLimitations."""
    items = _limitations(facts)
    return [t for kind, t in items if kind == "bias"], [t for kind, t in items if kind == "limit"]


def _limitations(facts: Facts) -> list[tuple[str, str]]:
    """[("bias" | "limit", Markdown text)] in the card's order."""
    flags, modes, models = facts.stats.get("flags", {}), facts.stats.get("stage_modes", {}), facts.stats.get("models", {})
    kept, n_in = facts.kept, facts.input_rows
    lim = []
    if modes.get("clip") != "off":
        lim.append(("bias",
            "**CLIP filtering is value-laden.** The similarity filter keeps captions that read the way "
            "CLIP's own web training data reads. Hong et al. (2024) audit CLIP filtering and find that data "
            "relating to several imputed demographic groups (LGBTQ+ people, older women, younger men) is "
            "excluded at higher rates, amplifying under-representation already present in the crawl; "
            "Pouget et al. (2024) show that filtering towards English image–text pairs hurts the "
            "representation of lower-income and non-Western communities; Radford et al. (2021, §7) report "
            "CLIP's own demographic biases. Birhane, Prabhu and Kahembwe (2021) document misogyny, "
            "pornography and malignant stereotypes that survived CLIP filtering in LAION-400M, and the "
            "LAION-5B paper (Schuhmann et al., 2022) discusses the same risks for its subsets."))
    if modes.get("toxicity") != "off":
        tox = models.get("toxicity", {})
        lim.append(("bias",
            "**Caption toxicity (Detoxify) flags words, not intent.** Its README warns that text with "
            "swearing, insults or profanity is likely to be classified as toxic regardless of tone or "
            "intent (e.g. humorous or self-deprecating), which can bias it against already vulnerable "
            "minority groups, and mentions of identity terms can raise scores: captions about some groups "
            "are removed more often than others."
            + (" The `original` model was trained on English Wikipedia talk-page comments (Jigsaw 2018): "
               "it is English-centric and scores other languages unreliably."
               if str(tox.get("name") or tox.get("spec") or flags.get("toxicity_model")).endswith("original") else "")
            + f" Model used: `{md(flags.get('toxicity_model'))}`."))
    if modes.get("nsfw") != "off":
        lim.append(("limit",
            "**The NSFW head misses things.** It is a small classifier on the CLIP image embedding; Hong et al. "
            "(2024) found that this kind of filter fails to remove sexually explicit content from a CLIP-"
            f"filtered web pool. Punsafe at or below {flags.get('max_punsafe')} does not mean safe: the "
            "dataset may contain nudity, violence and other disturbing images."))
    else:
        lim.append(("limit", "**No NSFW filter ran** (`--nsfw off`): the dataset is likely to contain sexual and violent imagery."))
    lim += [
        ("limit", "**Alt-text is noisy.** Captions are whatever the page's alt attribute said: SEO keywords, file "
         "names, text unrelated to the image, and text that reproduces stereotypes. "
         + ("CLIP filtering removes some mismatches, not the rest." if modes.get("clip") == "filter"
            else "No CLIP filter removed mismatched captions in this run.")),
        ("bias", "**The web is not the world.** What is online, in English, on crawlable pages and still reachable "
         "at download time over-represents some regions, languages, skin tones, ages and genders; "
         f"{pct(kept, n_in)} of the input survived here, and link rot removes some sites more than others."),
        ("limit", "**People and private data.** Images may show identifiable people, including minors, and "
         "personal information (faces, names in captions, documents); nothing in this pipeline detects "
         "or removes it."),
        ("limit", _abuse_screening(facts)),
    ]
    if consent_of(facts.stats) is not None:
        lim.append(("limit", "**Opt-outs are as of the crawl.** kiln honoured the machine-readable opt-outs in the "
                    "opt-out table when it fetched; a reservation of rights made later, or expressed only in a way "
                    "kiln does not read (terms of service, page text, unlisted registries), is not reflected."))
    return lim


def _abuse_screening(facts: Facts) -> str:
    """The limitation about known abuse material: what the run's image hash lists covered, if any."""
    if consent_of(facts.stats) is None:  # a run before kiln had --blocklist
        return ("**No screening against known abuse material.** kiln does not match images against hash lists "
                "of known child sexual abuse material. LAION withdrew its datasets (LAION-5B among them) in "
                "December 2023 after links to such material were found in LAION-5B (Thiel, 2023); build from "
                "metadata that has been cleaned of them (e.g. Re-LAION-5B) and screen with a hash-matching "
                "service before publishing or training.")
    lists = (blocklist_entries(facts) or {}).get("lists") or []
    image = [b for b in lists if any(n and k in ("image_sha256", "image_md5", "pdq") for k, n in (b.get("entries") or {}).items())]
    tail = ("LAION withdrew its datasets (LAION-5B among them) in December 2023 after links to such material were found "
            "in LAION-5B (Thiel, 2023); build from metadata that has been cleaned of them (e.g. Re-LAION-5B) and screen "
            "with a hash-matching service before publishing or training.")
    if not image:
        return ("**No screening against known abuse material.** This run matched the images against no hash list "
                "(`--blocklist` with image_sha256, image_md5 or pdq entries) of known child sexual abuse material. " + tail)
    names = ", ".join(f"`{md(b.get('name'))}`" for b in image)
    return (f"**Screening against known material is only as good as its lists.** The images were matched against {names} "
            "(exact hashes, and PDQ within the list's threshold); material not on those lists passes, and kiln runs no "
            "classifier for it. " + tail)


def limitations(facts: Facts) -> list[str]:
    """Known limitations and biases of the filters this run used, and what the card cannot answer."""
    lim = [text for _, text in _limitations(facts)]
    out = ["## Known limitations and biases\n", *(f"- {item}" for item in lim), "", "### Questions this card cannot answer\n"]
    for q in (
        "Did the people depicted consent to being photographed, published, or used to train models? Unknown.",
        "What is each image's copyright status? Only the source's LICENSE column is known (see the licence table); it is unverified, and '?' means unknown.",
        "What is the demographic composition (gender, age, skin tone, region, language) of the people and places shown? Not measured.",
        "How many images show minors, private individuals, or personal data? Not measured.",
        "Which images are duplicates or near-duplicates of each other? Only exact (URL, caption) duplicates were removed.",
        "What did the rejected rows look like? Their URLs, scores and reasons are in rejects/, but their images were not stored.",
        "Who created, funded and maintains this copy of the data? Not recorded by the run.",
    ):
        out.append(f"- {q}")
    out.append("")
    return out


def references() -> list[str]:
    return ["## References\n", *(f"- {ref}" for ref in (
        "Gebru, Morgenstern, Vecchione, Vaughan, Wallach, Daumé III, Crawford. *Datasheets for Datasets.* Communications of the ACM 64(12), 2021. arXiv:1803.09010.",
        "Birhane, Prabhu, Kahembwe. *Multimodal datasets: misogyny, pornography, and malignant stereotypes.* arXiv:2110.01963, 2021.",
        "Hong, Agnew, Kohno, Morgenstern. *Who's in and who's out? A case study of multimodal CLIP-filtering in DataComp.* EAAMO 2024. doi:10.1145/3689904.3694702.",
        "Pouget, Beyer, Bugliarello, Wang, Steiner, Zhai, Alabdulmohsin. *No Filter: Cultural and Socioeconomic Diversity in Contrastive Vision-Language Models.* NeurIPS 2024.",
        "Radford et al. *Learning Transferable Visual Models From Natural Language Supervision* (CLIP). ICML 2021, §7.",
        "Schuhmann et al. *LAION-400M: Open Dataset of CLIP-Filtered 400 Million Image-Text Pairs.* arXiv:2111.02114, 2021.",
        "Schuhmann et al. *LAION-5B: An open large-scale dataset for training next generation image-text models.* NeurIPS 2022 Datasets and Benchmarks.",
        "Saharia et al. *Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding* (Imagen). NeurIPS 2022.",
        "Thiel. *Identifying and Eliminating CSAM in Generative ML Training Data and Models.* Stanford Internet Observatory, December 2023.",
        "Hanu and Unitary team. *Detoxify*, README, section \"Limitations and ethical considerations\". https://github.com/unitaryai/detoxify",
    ))]

