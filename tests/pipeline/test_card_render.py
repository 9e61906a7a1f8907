"""pipeline.card.render: the Markdown sections, on hand-made Facts (no dataset on disk)."""

import shlex

from pipeline.card.facts import SCORES, Facts, FloatHist
from pipeline.card.render import domain_table, md, model_filters, opt_outs, plot_ref, reconstructed_command, render, run_flags

OLD_FLAGS = {  # stats.json's flags as runs before the recorded `command` wrote them
    "input": "/data/laion/part-*.parquet", "output": "/out/ds", "samples_per_shard": 60, "overwrite": True, "quiet": True,
    "card": False, "allow_upscale": False, "image_size": 1024, "image_size_unknown_to_kiln": 3, "options": None,
    "disallowed_directives": "noai,noimageai,noindex,noimageindex", "toxicity_labels": "", "clip_model": "local-dir:/m/clip dir",
    "min_clip_similarity": 0.3, "nsfw_head": None,
}


def _facts(**stats) -> Facts:
    facts = Facts("/out/ds", {"flags": OLD_FLAGS, "stage_modes": {"clip": "filter", "toxicity": "score", "nsfw": "off"}, **stats}, {})
    facts.scores = {s.column: FloatHist(s.lo, s.hi, s.bins, ("kept", "rejected_here", "rejected_elsewhere")) for s in SCORES}
    facts.columns = {"url": "URL", "caption": "TEXT", "id": "SAMPLE_ID"}
    return facts


def test_the_recorded_command_is_printed_exactly():
    command = "kiln prepare --input /data/x.parquet --output /out/ds --url-col url --disallowed-directives=noai '--runner=Direct Runner'"
    lines = run_flags(_facts(command=command, beam_options={"runner": "DataflowRunner"}))
    text = "\n".join(lines)
    assert "To reproduce (same input files, same models, same kiln commit):\n\n```\n" + command + "\n```\n" in text
    assert "rebuilt" not in text and "DataflowRunner" not in text  # Beam options are the command's own business


def test_older_datasets_get_a_labelled_reconstruction():
    text = "\n".join(run_flags(_facts(beam_options={"runner": "DataflowRunner", "project": "p"})))
    assert "**rebuilt from the flags in stats.json**: this run predates the exact command" in text
    block = text.split("```\n")[1].rstrip("\n")
    assert block == ("kiln prepare --input '/data/laion/part-*.parquet' --output /out/ds --samples-per-shard 60 --no-card "
                     "--clip-model 'local-dir:/m/clip dir' --min-clip-similarity 0.3 --project=p --runner=DataflowRunner")
    # What the reconstruction prints parses back to the same flags.
    assert shlex.split(reconstructed_command(OLD_FLAGS))[2:6] == ["--input", "/data/laion/part-*.parquet", "--output", "/out/ds"]
    # Settings at their defaults are left out, in either spelling of a list (JSON list or comma string).
    assert reconstructed_command({"input": "i", "output": "o", "disallowed_directives": ["noai", "noimageai", "noindex", "noimageindex"]}) \
        == "kiln prepare --input i --output o"
    assert reconstructed_command({"input": "i", "output": "o", "toxicity_labels": ["toxicity", "insult"]}) \
        == "kiln prepare --input i --output o --toxicity-labels toxicity,insult"


def test_every_flag_is_a_table_row_with_its_stage_modes():
    lines = run_flags(_facts(command="kiln prepare"))
    assert "| `--samples-per-shard` | `60` |" in lines and "| `--nsfw-head` | `None` |" in lines
    assert "| `--disallowed-directives` | `noai,noimageai,noindex,noimageindex` |" in lines
    assert "Stage modes: clip `filter`, toxicity `score`, nsfw `off`.\n" in lines


def test_domain_table_names_the_url_column_the_run_used():
    facts = _facts()
    facts.columns["url"] = "image_url"
    facts.domains.update({"a.example": 3, "b.example": 1})
    facts.kept = 4
    assert domain_table(facts) == ["### Top source domains (host of image_url, kept rows)\n", "| domain | samples | share |\n| --- | ---: | ---: |",
                                   "| a.example | 3 | 75.00% |", "| b.example | 1 | 25.00% |", "\n2 distinct domains in all.\n"]


def test_model_filters_follow_the_score_table():
    facts = _facts()
    facts.stats["flags"] = {"max_toxicity": 0.5, "min_clip_similarity": 0.3, "max_punsafe": 0.4}
    facts.scores["clip_similarity"].add("kept", [0.31, 0.5])
    lines = model_filters(facts, {"clip_similarity": "card_plots/clip_similarity.png", "punsafe": "the NSFW stage was off"})
    assert lines[1].startswith("- **Caption toxicity (Detoxify)** — mode `score`, threshold `--max-toxicity 0.5` "
                               "(reject above; not applied in this mode). Kept: no values.")
    assert lines[2].startswith("- **CLIP image–caption similarity** — mode `filter`, threshold `--min-clip-similarity 0.3` "
                               "(reject below). Kept: n=2, mean 0.4050")
    assert lines[3].startswith("- **NSFW head on the CLIP image embedding** — mode `off`")
    assert lines[-3:] == ["*Plot skipped: no data.*\n",
                          "![CLIP image–caption similarity distribution with its threshold](card_plots/clip_similarity.png)\n",
                          "*Plot skipped: the NSFW stage was off.*\n"]


def test_markdown_cells_and_plot_references():
    assert md("a|b\nc") == "a\\|b c" and md("") == '""' and md({"b": 1, "a": [2]}) == '{"a": [2], "b": 1}' and md(0.25) == "0.25"
    assert plot_ref({"x": "card_plots/x.png"}, "x", "X") == "![X](card_plots/x.png)\n"
    assert plot_ref({}, "x", "X") == "*Plot skipped: no data.*\n"


def test_render_puts_the_sections_in_datasheet_order():
    facts = _facts(command="kiln prepare", input={"rows": 0, "files": []})
    facts.stats["flags"] = {"max_bytes": 100}
    text = render(facts, {}, "Empty", 0, None)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Motivation", "## Composition", "## Collection process", "## Preprocessing and filtering", "## Uses",
                        "## Distribution", "## Maintenance", "## Known limitations and biases", "## References"]
    assert text.startswith("# Empty\n\n") and text.endswith("unitaryai/detoxify\n")


def test_opt_out_table_reads_the_directives_as_a_list_or_a_comma_separated_string():
    for listed in (["noai", "NoImageAI"], "noai, NoImageAI"):
        facts = _facts()
        facts.stats["flags"] = {"disallowed_directives": listed, "user_agent_token": "kiln"}
        facts.reasons = {"download": {"robots_noai": 2, "robots_noindex": 1}}
        facts.input_rows = 10
        rows = [line for line in opt_outs(facts) if line.startswith("| `")]
        assert rows == ["| `noai` | 2 | 20.00% |", "| `noimageai` | 0 | 0.00% |", "| `noindex` | 1 | 10.00% |"], listed


CONSENT = {
    "user_agent": "kiln/0.1.0 (+https://example/kiln)", "user_agent_token": "kiln",
    "protocols": {"robots_txt": {"enabled": True, "ai_tokens": ["GPTBot"], "origins": 7, "origins_no_rules": 1, "origins_unavailable": 2,
                                 "on_unavailable": "disallow"},
                  "tdmrep": {"enabled": False, "origins": 0, "origins_unavailable": 0, "on_unavailable": "reserve"},
                  "x_robots_tag": {"enabled": True, "directives": ["noai"]},
                  "optout_list": {"enabled": False, "files": []}, "c2pa": {"enabled": True, "reader": None}},
    "blocklists": [{"name": "csam-hashes", "path": "/l.txt", "sha256": "ab" * 32, "entries": {"pdq": 5, "sample_id": 2}, "pdq_threshold": 31}],
}


def test_opt_out_table_per_protocol_and_blocklist_table_from_the_consent_record():
    import collections

    facts = _facts(consent=CONSENT)
    facts.input_rows = 100
    facts.funnel = [{"stage": "blocklist", "reasons": {"blocklist_sample_id": 2}}, {"stage": "optout", "reasons": {
        "robotstxt_disallowed": 3, "robotstxt_unavailable": 4}}, {"stage": "download", "reasons": {"robots_noai": 1, "tdm_reservation": 9}},
        {"stage": "decode", "reasons": {"blocklist_pdq": 1, "c2pa_not_allowed": 2}}]
    facts.reasons = {f["stage"]: f["reasons"] for f in facts.funnel}
    facts.blocklist_rows = collections.Counter({("csam-hashes", "blocklist_sample_id"): 2, ("csam-hashes", "blocklist_pdq"): 1})
    text = "\n".join(opt_outs(facts))
    assert ("| robots.txt (RFC 9309) | yes | 7 | 7.00% | 7 | 2 | `disallow`: treated as a complete disallow (RFC 9309 §2.3.1.4): "
            "every URL of the origin removed |") in text
    # A protocol switched off still shows the rows its reasons hold (here the header reason), marked as not honoured.
    assert "| TDMRep (W3C: tdmrep.json and the tdm-reservation header) | **no** | 9 | 9.00% | 0 | 0 |" in text
    assert "| X-Robots-Tag response header | yes | 1 | 1.00% | n/a | n/a | n/a |" in text
    assert "| C2PA training-and-mining assertion in the image | yes | 2 | 2.00% | n/a | n/a | n/a |" in text
    assert "| robots_txt | `optout/robotstxt_unavailable` | 4 |" in text
    assert "| directive honoured | rows removed | share of input |\n| --- | ---: | ---: |\n| `noai` | 1 | 1.00% |" in text
    assert "| csam-hashes | `abababababababab` | pdq 5, sample_id 2 | pdq 1, sample_id 2 |" in text
    assert "3 rows removed by the lists together" in text
    assert "It does not read robots.txt" not in text


def test_the_card_funnel_shows_the_blocklist_and_optout_stages(tmp_path):
    from pipeline.card import build_card
    from tests.pipeline.test_croissant import consent_dataset

    text, _, _ = build_card(str(consent_dataset(tmp_path / "ds")))
    funnel = text[text.index("### Funnel"):text.index("### Reject reasons")]
    assert "| prefilter | filter | 31 | 30 | 1 |" in funnel
    assert "| blocklist | filter | 30 | 28 | 2 |" in funnel and "| optout | filter | 28 | 23 | 5 |" in funnel
    assert "**Screening against known material is only as good as its lists.** The images were matched against `child-safety`" in text
