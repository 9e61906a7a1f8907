"""pipeline/config.py: the one configuration schema of `kiln prepare` and everything derived from it."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    SETTINGS,
    ConfigError,
    PrepareConfig,
    command_argv,
    command_line,
    fingerprint,
    flat,
    parse_prepare,
    prepare_parser,
    resolve,
)

REPO = Path(__file__).resolve().parents[2]
BASE = ["--input", "in/*.parquet", "--output", "out", "--nsfw-head", "head.safetensors"]
FILES = [{"path": "in/a.parquet", "bytes": 100, "rows": 10}]


def cfg_of(*flags) -> PrepareConfig:
    cfg, beam = parse_prepare([*BASE, *flags])
    assert beam == []
    return cfg


def test_every_flag_shows_its_default_in_help():
    parser = prepare_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for key, s in SETTINGS.items():
        action = by_dest[key]
        assert action.option_strings == [s.flag]
        if s.required:
            assert action.required
        else:
            assert re.search(r"\[[^\[\]]+\]$", action.help), (s.flag, action.help)
    text = parser.format_help()
    assert "[10000]" in text and "[center_crop]" in text and "[ViT-B-32:openai]" in text and "[32 MiB]" in text


def test_defaults_are_the_documented_ones():
    cfg = cfg_of()
    assert cfg.input.url_col == "URL" and cfg.input.caption_col == "TEXT" and cfg.input.id_col == "SAMPLE_ID"
    assert cfg.output.samples_per_shard == 10_000 and cfg.image.image_size == 1024 and cfg.image.min_image_size == 64
    assert cfg.clip.min_clip_similarity == 0.28 and cfg.clip.max_punsafe == 0.5 and cfg.t5.max_length == 128
    assert cfg.download.disallowed_directives == ("noai", "noimageai", "noindex", "noimageindex")
    assert cfg.toxicity.labels == () and cfg.output.card is True and cfg.image.jpeg_draft is True
    assert cfg.image.draft_target == 1024
    assert cfg_of("--allow-upscale").image.draft_target is None


@pytest.mark.parametrize("flags, message", [
    (["--samples-per-shard", "-5"], "--samples-per-shard -5: must be >= 1"),
    (["--encode-quality", "500"], "--encode-quality 500: must be <= 100"),
    (["--encode-format", "png", "--encode-quality", "95"], "PNG takes a compression level 0-9"),
    (["--encode-quality", "0"], "jpg quality is 1-100"),
    (["--image-size", "0"], "--image-size 0: must be >= 1"),
    (["--download-timeout", "0"], "--download-timeout 0.0: must be > 0"),
    (["--max-toxicity", "1.5"], "--max-toxicity 1.5: must be <= 1.0"),
    (["--min-caption-chars", "50", "--max-caption-chars", "10"], "is above --max-caption-chars"),
    (["--clip", "off"], "--nsfw needs the CLIP image embedding"),
    (["--url-col", "TEXT"], "name the same column"),
    (["--allow-hosts", "http://127.0.0.1:80"], "expected HOST:PORT"),
    (["--max-aspect-ratio", "0.5"], "must be >= 1.0"),
])
def test_bad_values_are_refused_before_any_work(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg_of(*flags)


def test_nsfw_without_a_head_is_refused_with_the_way_out():
    # the default head is LAION's B/32 one (a registry name, resolved from --models DIR); an empty one is refused
    assert parse_prepare(["--input", "x", "--output", "y"])[0].clip.nsfw_head == "nsfw-b32"
    with pytest.raises(ConfigError, match=r"--nsfw needs --nsfw-head HEAD .* or --nsfw off"):
        parse_prepare(["--input", "x", "--output", "y", "--nsfw-head", ""])
    assert parse_prepare(["--input", "x", "--output", "y", "--nsfw", "off"])[0].clip.nsfw_mode == "off"


def test_the_reproduce_command_parses_back_to_the_same_config():
    cfg = cfg_of("--url-col", "url", "--caption-col", "caption", "--image-size", "256", "--no-card", "--no-jpeg-draft",
                 "--toxicity-labels", "insult,threat", "--disallowed-directives", "noai", "--allow-upscale",
                 "--clip", "score", "--min-clip-similarity", "0.3", "--t5", "off", "--download-threads", "8",
                 "--quiet", "--overwrite")
    argv = command_argv(cfg, ["--runner=DirectRunner"])
    assert argv[-1] == "--runner=DirectRunner"
    again, beam = parse_prepare(argv)
    assert beam == ["--runner=DirectRunner"]
    # --quiet and --overwrite say how to run, not what to make: left out of the command.
    assert "--quiet" not in argv and "--overwrite" not in argv
    assert flat(again) == {**flat(cfg), "quiet": False, "overwrite": False}
    line = command_line(cfg)
    assert line.startswith("kiln prepare --input 'in/*.parquet' --output out ") and "--image-size 256" in line
    assert "--samples-per-shard" not in line  # at its default


def test_fingerprint_covers_exactly_the_settings_that_change_the_output():
    base = fingerprint(cfg_of(), FILES)
    assert fingerprint(cfg_of(), FILES) == base
    for flags in (["--image-size", "512"], ["--min-clip-similarity", "0.3"], ["--caption-col", "caption"],
                  ["--toxicity", "score"], ["--t5-max-length", "64"]):
        assert fingerprint(cfg_of(*flags), FILES) != base, flags
    for flags in (["--download-threads", "4"], ["--model-batch-size", "8"], ["--quiet"], ["--no-card"], ["--device", "cpu"],
                  ["--decode-threads", "1"], ["--gpu-resource-hint", "type:nvidia-l4;count:1"]):
        assert fingerprint(cfg_of(*flags), FILES) == base, flags
    assert fingerprint(cfg_of(), [{**FILES[0], "rows": 11}]) != base
    assert {s.key for s in SETTINGS.values() if s.meta["result"]} >= {
        "samples_per_shard", "image_size", "min_image_size", "max_bytes", "allow_hosts", "t5_model", "url_col"}


def test_options_file_values_are_typed_and_checked_like_flags():
    cfg = resolve({"input": "x", "output": "y"}, {"image_size": 256, "disallowed_directives": ["noai"], "nsfw": "off",
                                                 "toxicity_labels": "insult, threat"}, source="f.yaml")
    assert cfg.image.image_size == 256 and cfg.download.disallowed_directives == ("noai",)
    assert cfg.toxicity.labels == ("insult", "threat")
    with pytest.raises(ConfigError, match=r"f.yaml: kiln: image_size: expected an integer, got 2.5"):
        resolve({"input": "x", "output": "y"}, {"image_size": 2.5}, source="f.yaml")
    with pytest.raises(ConfigError, match=r"f.yaml: kiln: 'input' is not a kiln prepare setting"):
        resolve({"input": "x", "output": "y"}, {"input": "z"}, source="f.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "beam_options").glob("*.yaml")))
def test_every_shipped_options_file_kiln_section_is_valid(name):
    kiln = yaml.safe_load((REPO / "beam_options" / name).read_text()).get("kiln") or {}
    assert set(kiln) <= set(SETTINGS), set(kiln) - set(SETTINGS)
    cfg = resolve({"input": "x", "output": "y", "nsfw_head": "h.safetensors"}, kiln, source=name)
    for key, value in kiln.items():
        assert flat(cfg)[key] == value


def _add_argument_flags(path: Path) -> set[str]:
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return flags


def test_no_prepare_flag_is_defined_outside_the_schema():
    """The demo, the options-file loader and the card once each had their own parser of these flags."""
    prepare_flags = {s.flag for s in SETTINGS.values()}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        # `kiln embed-prompts`, `kiln subset` and `kiln recheck` are their own commands: flags of the same
        # name there (--blocklist, --retries, --decontaminate, ...) mean that command's own setting.
        if path.name in ("config.py", "embed_prompts.py", "subset.py", "recheck.py"):
            continue
        clash = _add_argument_flags(path) & prepare_flags
        assert not clash, (path, clash)
