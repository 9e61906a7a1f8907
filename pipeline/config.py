"""`kiln prepare`'s configuration: one dataclass tree in which each setting is written once.

Every field carries its help text, default, valid range or choices, and whether it changes what
lands in the output (`result`). Everything else follows from the tree:

  add_arguments(parser)       the `kiln prepare` flags, every --help line showing its default
  resolve(cli, file_values)   typed values from the command line over an options file's `kiln:`
                              section over the defaults -> a validated PrepareConfig
  parse_prepare(argv)         the same, from an argv list (tests, the demo, benchmarks)
  fingerprint(cfg, inputs)    the resume check: only `result` settings and the input files count
  command_line(cfg, beam)     the exact command that reproduces a run (stats.json, the card)
  validate(cfg)               ranges and cross-setting rules, checked before any work starts

A setting's `key` is its flat name: the flag is `--key` with dashes, the `kiln:` key in
`beam_options/*.yaml` is `key`, and stats.json's "flags" maps key -> value. Stages receive their
section (`cfg.image`, `cfg.download`, ...) as it is.

This module imports only the standard library, so `kiln --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import re
import json
import shlex
from dataclasses import dataclass, field
from typing import Any, Iterator

FILTER_MODES = ("filter", "score", "off")
RESIZE_MODES = ("center_crop", "keep_ratio", "keep_ratio_largest", "border", "no")  # img2dataset's
INTERPOLATIONS = ("nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4")  # img2dataset's
ENCODE_FORMATS = ("jpg", "png", "webp")
DEFAULT_MAX_PIXELS = 178_956_970  # 2x Pillow's MAX_IMAGE_PIXELS (89,478,485): where Pillow itself starts raising
from pipeline.errors import UserError  # noqa: E402 - stdlib-only, like this module

REQUIRED = object()  # default of a setting that has none (--input, --output)


class ConfigError(UserError, ValueError):
    """A setting with a bad value, an unknown setting, or settings that contradict each other."""


def setting(default, help: str, *, result: bool = True, key: str | None = None, flag: str | None = None,
            type=None, lo=None, hi=None, lo_open: bool = False, choices=None, metavar: str | None = None,
            shown: str | None = None, repeat: bool = False):
    """A config field. `result`: changes what lands in the output (part of the resume fingerprint).
    `lo`/`hi`: inclusive bounds (`lo_open`: lo excluded). `flag`: for booleans, the switch that
    flips the default (`--no-card`). `shown`: the default as --help prints it, where str() is unclear."""
    meta = dict(help=help, result=result, key=key, flag=flag, type=type, lo=lo, hi=hi, lo_open=lo_open,
                choices=choices, metavar=metavar, shown=shown, repeat=repeat)
    if default is REQUIRED:
        return field(default=None, metadata={**meta, "required": True})
    return field(default=default, metadata=meta)


# -- the tree ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputConfig:
    input: str = setting(REQUIRED, "metadata parquet file or glob (local, gs://, s3:// via Beam filesystems)", result=False, type=str, metavar="GLOB")
    # img2dataset's flag names; LAION-400M's column names by default.
    url_col: str = setting("URL", "input column holding the image URL (DataComp/COYO: url)", type=str)
    caption_col: str = setting("TEXT", "input column holding the caption (DataComp/COYO: text, CC12M: caption)", type=str)
    id_col: str = setting("SAMPLE_ID", "input column holding the row's own id, carried into rejects and meta (may be absent)", type=str)
    width_col: str = setting("WIDTH", "input column with the declared image width in px (may be absent)", type=str)
    height_col: str = setting("HEIGHT", "input column with the declared image height in px (may be absent)", type=str)


@dataclass(frozen=True)
class OutputConfig:
    output: str = setting(REQUIRED, "dataset directory to write", result=False, type=str, metavar="DIR")
    samples_per_shard: int = setting(10_000, "target kept+rejected candidates per shard (shards are uid ranges)", type=int, lo=1)
    overwrite: bool = setting(False, "delete kiln's files in an existing output first, instead of skipping / resuming it", result=False)
    card: bool = setting(True, "the dataset card (README.md + card_plots/)", result=False, flag="--no-card")
    quiet: bool = setting(False, "no progress / funnel printout", result=False)


@dataclass(frozen=True)
class PrefilterConfig:
    min_caption_chars: int = setting(3, "reject captions shorter than this, after stripping", type=int, lo=0)
    max_caption_chars: int = setting(1000, "reject captions longer than this, after stripping", type=int, lo=1)


@dataclass(frozen=True)
class DownloadConfig:
    timeout_s: float = setting(20.0, "total deadline per URL in seconds: redirects, retries, body", key="download_timeout", type=float, lo=0, lo_open=True)
    connect_timeout_s: float = setting(5.0, "seconds per connection attempt (within the total deadline)", key="connect_timeout", type=float, lo=0, lo_open=True, result=False)
    retries: int = setting(2, "extra attempts on 429/5xx/connection errors, honouring Retry-After", type=int, lo=0, hi=20)
    max_redirects: int = setting(5, "redirect hops followed, each re-checked", type=int, lo=0, hi=50)
    max_bytes: int = setting(32 * 2**20, "byte cap per image", type=int, lo=1, shown="32 MiB")
    # Politeness for the whole job, not per worker (pipeline/download.py; docs/running-at-scale.md,
    # "Politeness across workers"): rows are grouped by (host:port, crc32(uid) mod buckets).
    per_host_concurrency: int = setting(16, "K: requests in flight to one host:port for the whole job, all workers together "
                                        "(split over its --per-host-buckets; each worker process also holds every host:port, "
                                        "redirect targets included, to K)", type=int, lo=1, result=False)
    per_host_buckets: int = setting(4, "B: groups each host:port's URLs are split into (by uid); each group runs on one worker "
                                    "with K/B of the requests in flight; more spreads a big host over more workers; <= K",
                                    type=int, lo=1, hi=4096, result=False)
    per_host_rate: float = setting(0.0, "URLs started per second to one host:port for the whole job (each bucket gets its "
                                   "share); a 429/503 halves a bucket's window and pauses the host on that worker for "
                                   "its Retry-After; 0: no rate limit", type=float, lo=0, result=False)
    threads: int = setting(64, "requests in flight per worker process", key="download_threads", type=int, lo=1, hi=4096, result=False)
    user_agent_token: str = setting("kiln", "our bot token, for UA-scoped X-Robots-Tag directives", type=str)
    disallowed_directives: tuple = setting(("noai", "noimageai", "noindex", "noimageindex"),
                                           "comma-separated X-Robots-Tag directives that opt an image out", type=tuple)
    allow_hosts: str = setting("", "comma-separated exact host:port pairs allowed despite a non-public address (tests, demo)", type=str, shown="none")

    def fetch_config(self, **overrides):
        """The fetcher's own config (pipeline.fetch), from this section (`overrides`: FetchConfig fields
        set from elsewhere, e.g. the consent section's tdm_header / x_robots_tag)."""
        from pipeline.fetch import FetchConfig, parse_allow_hosts

        return FetchConfig(
            timeout_s=self.timeout_s,
            connect_timeout_s=min(self.connect_timeout_s, self.timeout_s),
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            retries=self.retries,
            per_host_concurrency=self.per_host_concurrency,
            user_agent_token=self.user_agent_token,
            disallowed_directives=tuple(d.lower() for d in self.disallowed_directives),
            allow_hosts=parse_allow_hosts(self.allow_hosts),
            **overrides,
        )


# robots.txt user-agent tokens of crawlers that collect AI training data: a site whose robots.txt
# gives one of them its own group disallowing a URL has opted that URL out of training (LAION's
# images came from Common Crawl, CCBot; img2dataset is the downloader LAION-style sets use).
AI_CRAWLER_TOKENS = ("CCBot", "GPTBot", "Google-Extended", "ClaudeBot", "anthropic-ai", "Applebot-Extended",
                     "Bytespider", "meta-externalagent", "cohere-ai", "img2dataset")


@dataclass(frozen=True)
class ConsentConfig:
    # pipeline/consent.py: which stage checks what; every protocol on by default.
    robots_txt: bool = setting(True, "honour robots.txt (RFC 9309), fetched once per origin for the whole job: the group of "
                               "--user-agent-token (else `*`) and the own groups of --ai-crawler-tokens; 5xx or unreachable = "
                               "complete disallow", flag="--no-robots-txt")
    ai_crawler_tokens: tuple = setting(AI_CRAWLER_TOKENS, "robots.txt user-agent tokens whose own group disallowing a URL is "
                                       "read as a training opt-out for it", type=tuple)
    rules_ttl_s: float = setting(86400.0, "seconds a fetched robots.txt / tdmrep.json is used; a group of URLs checked later "
                                 "fetches it again (RFC 9309 2.4: at most 24 h)", key="rules_ttl", type=float, lo=0, lo_open=True,
                                 result=False)
    tdmrep: bool = setting(True, "honour W3C TDMRep: /.well-known/tdmrep.json per origin (fetched once, like robots.txt) and "
                           "the tdm-reservation response header", flag="--no-tdmrep")
    x_robots_tag: bool = setting(True, "honour X-Robots-Tag response headers (the directives of --disallowed-directives)",
                                 flag="--no-x-robots-tag")
    optout_list: tuple = setting((), "offline opt-out list file(s): a domain or a URL prefix per line (registries, requests "
                                 "received by mail); repeat the flag for several", type=tuple, metavar="FILE", repeat=True)
    c2pa: bool = setting(True, "honour a C2PA training-and-mining assertion embedded in the image (notAllowed: rejected)",
                         flag="--no-c2pa")
    blocklist: tuple = setting((), "hash blocklist file(s): SAMPLE_ID, URL sha256/md5 and domain entries are checked before "
                               "download, image sha256/md5 and PDQ entries right after decode; repeat the flag for several",
                               type=tuple, metavar="FILE", repeat=True)
    pdq_threshold: int = setting(31, "PDQ Hamming distance (of 256 bits) at or below which an image matches a list's pdq entry "
                                 "(a list's own `# pdq_threshold:` line wins)", type=int, lo=0, hi=255)


@dataclass(frozen=True)
class ImageConfig:
    # Size rules: checked on the metadata's declared size (prefilter) and on the decoded image.
    min_image_size: int = setting(64, "shorter side in px, declared and decoded", type=int, lo=1)
    max_aspect_ratio: float = setting(3.0, "long/short side, declared and decoded", type=float, lo=1.0)
    max_image_pixels: int = setting(DEFAULT_MAX_PIXELS, "decompression-bomb limit, from the header before any pixel is decoded", type=int, lo=1)
    jpeg_draft: bool = setting(True, "decoding large JPEGs DCT-reduced towards --image-size (off: decode at full size, then resize)", flag="--no-jpeg-draft")
    # Resize and encode (img2dataset's names and defaults, except: never upscale, DESIGN.md).
    image_size: int = setting(1024, "stored size in px (never upscaled unless --allow-upscale)", type=int, lo=1, hi=16384)
    resize_mode: str = setting("center_crop", "img2dataset's resize mode", type=str, choices=RESIZE_MODES)
    downscale_interpolation: str = setting("area", "interpolation when shrinking", type=str, choices=INTERPOLATIONS)
    upscale_interpolation: str = setting("lanczos", "interpolation when enlarging (only with --allow-upscale)", type=str, choices=INTERPOLATIONS)
    allow_upscale: bool = setting(False, "upscale small images to --image-size (off: a super-resolution stage must not learn fake pixels)")
    encode_format: str = setting("jpg", "stored image format", type=str, choices=ENCODE_FORMATS)
    encode_quality: int = setting(95, "JPEG/WebP quality 1-100; PNG compression level 0-9", type=int, lo=0, hi=100)
    decode_threads: int = setting(2, "decode/resize threads per worker process", type=int, lo=1, hi=256, result=False)

    @property
    def draft_target(self) -> int | None:
        """The size JPEGs may be DCT-reduced towards while decoding (None: decode at full size)."""
        if self.jpeg_draft and self.resize_mode in ("center_crop", "keep_ratio") and not self.allow_upscale:
            return self.image_size
        return None


@dataclass(frozen=True)
class ToxicityConfig:
    mode: str = setting("filter", "caption toxicity (Detoxify), before any download", key="toxicity", type=str, choices=FILTER_MODES)
    model: str = setting("original", "Detoxify: original | unbiased | multilingual (torch.hub cache or --models DIR) | a registry name | local:DIR", key="toxicity_model", type=str)
    max_toxicity: float = setting(0.5, "reject above this max over --toxicity-labels (Detoxify's own cut)", type=float, lo=0.0, hi=1.0)
    labels: tuple = setting((), "comma-separated Detoxify labels to take the max over", key="toxicity_labels", type=tuple, shown="all of the model's")


@dataclass(frozen=True)
class ClipConfig:
    clip_mode: str = setting("filter", "CLIP image-caption similarity, after decode", key="clip", type=str, choices=FILTER_MODES)
    clip_model: str = setting("ViT-B-32:openai", "open_clip NAME:PRETRAINED (HF cache or --models DIR) | a registry name | local:DIR | hf-hub:ORG/REPO[@REV]", type=str)
    min_clip_similarity: float = setting(0.28, "reject below this cosine similarity (LAION-5B English: 0.28)", type=float, lo=-1.0, hi=1.0)
    nsfw_mode: str = setting("filter", "LAION's NSFW head on the same CLIP image embedding", key="nsfw", type=str, choices=FILTER_MODES)
    nsfw_head: str | None = setting("nsfw-b32", "NSFW head for --clip-model: a registry name (LAION's B/32 head by default; from --models DIR) | local:FILE|DIR | a .safetensors/.pt path", type=str, metavar="HEAD")
    max_punsafe: float = setting(0.5, "reject above this punsafe (LAION's recommended cut)", type=float, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class T5Config:
    mode: str = setting("embed", "store each kept caption's frozen T5 embedding", key="t5", type=str, choices=("embed", "off"))
    model: str = setting("google/t5-v1_1-xxl", "hub id[@REV] in the local HF cache (or --models DIR) | a registry name | local:DIR (Imagen §2.1: T5-XXL)", key="t5_model", type=str)
    max_length: int = setting(128, "tokens kept per caption, EOS included (Imagen: 128)", key="t5_max_length", type=int, lo=2, hi=4096)
    # pipeline/t5store.py, SHARDS.md. Defaults from docs/running-at-scale.md's bytes per sample: one copy
    # ("both" costs 27.5 TB more on LAION-400M, for no reader that needs it); float16 until float8 is shown harmless.
    store: str = setting("tar", "where each T5 embedding is stored: tar (KEY.t5.*, what the trainer streams), meta "
                         "(the meta parquet's t5 column) or both", key="t5_store", type=str, choices=("tar", "meta", "both"))
    dtype: str = setting("float16", "stored number format: float16 (KEY.t5.npy), bfloat16 (raw, same bytes), float8 "
                         "(e4m3fn + a per-sample scale, half the bytes)", key="t5_dtype", type=str, choices=("float16", "bfloat16", "float8"))
    max_tokens: int | None = setting(None, "padded tokens per T5 forward pass", key="t5_max_tokens", type=int, lo=1, result=False, shown="4096 CPU, 16384 CUDA")
    batch_tokens: int | None = setting(None, "caption tokens per Beam batch into T5 (batches sized by token count, then sorted by "
                                       "length and packed into --t5-max-tokens passes); 0: batches of 256 captions",
                                       key="t5_batch_tokens", type=int, lo=0, result=False,
                                       shown="4 x --t5-max-tokens (65536) with a GPU, 0 on CPU")
    cross_process: bool = setting(False, "one T5 per machine shared by all worker processes (Beam MultiProcessShared), e.g. on a GPU VM",
                                  key="t5_cross_process", result=False)


@dataclass(frozen=True)
class DedupConfig:
    # pipeline/dedup.py: one stage after EmbedT5, before the writer; a removed sample is a reject of
    # stage dedup naming the kept sample it duplicates (docs/running-at-scale.md: what each rule costs).
    dedup: tuple = setting((), "duplicate rules among the samples that passed every filter, comma-separated: exact (same "
                           "stored image bytes), pdq (PDQ hash within --dedup-pdq-radius), semantic (CLIP image embedding "
                           "cosine >= --dedup-cosine; needs --clip score or filter). Kept: the larger stored image, then "
                           "the higher clip_similarity, then the smaller uid", key="dedup", type=tuple, shown="none",
                           metavar="RULES")
    pdq_radius: int = setting(15, "PDQ Hamming distance (of 256 bits) at or below which two images are near duplicates "
                              "(hashes of quality < 50 never match); the index's cost grows fast above 15",
                              key="dedup_pdq_radius", type=int, lo=0, hi=128)
    cosine: float = setting(0.95, "CLIP image-embedding cosine at or above which two images are semantic duplicates",
                            key="dedup_cosine", type=float, lo=-1.0, hi=1.0)
    decontaminate: str | None = setting(None, "an evaluation set (a folder of images, a webdataset .tar, or a folder of "
                                        ".tar shards): samples near any of its images are removed (reason eval_overlap)",
                                        key="decontaminate", type=str, metavar="PATH", shown="none")
    eval_pdq_radius: int = setting(31, "PDQ distance at or below which a sample matches an evaluation image",
                                   key="decontaminate_pdq_radius", type=int, lo=0, hi=128)
    eval_cosine: float | None = setting(None, "also match evaluation images by CLIP image-embedding cosine at or above this "
                                        "(loads --clip-model for the evaluation images)", key="decontaminate_cosine",
                                        type=float, lo=-1.0, hi=1.0, shown="off: PDQ only")

    @property
    def enabled(self) -> bool:
        """pipeline.dedup.rules_of(this) gives the rules; the stage runs when any is on."""
        return bool(self.dedup or self.decontaminate)


@dataclass(frozen=True)
class ModelsConfig:
    models: str | None = setting(None, "a folder written by `kiln models fetch` (e.g. `kiln models fetch laion400m-defaults --to DIR`): "
                                 "every model flag naming a registry model, or left at its default, is taken from there",
                                 key="models", type=str, result=False, metavar="DIR", shown="none")
    batch_size: int = setting(64, "batch size through each model", key="model_batch_size", type=int, lo=1, hi=65536, result=False)
    device: str | None = setting(None, "torch device for the models", type=str, result=False, shown="cuda if available, else cpu")
    gpu_resource_hint: str | None = setting(
        None, "Beam accelerator resource hint for the model stages only (Dataflow format, e.g. "
        "'type:nvidia-l4;count:1;install-nvidia-driver'); never on Download or the writers", type=str, result=False, metavar="HINT", shown="none")


@dataclass(frozen=True)
class PrepareConfig:
    input: InputConfig
    output: OutputConfig
    prefilter: PrefilterConfig = PrefilterConfig()
    download: DownloadConfig = DownloadConfig()
    consent: ConsentConfig = ConsentConfig()
    image: ImageConfig = ImageConfig()
    toxicity: ToxicityConfig = ToxicityConfig()
    clip: ClipConfig = ClipConfig()
    t5: T5Config = T5Config()
    dedup: DedupConfig = DedupConfig()
    models: ModelsConfig = ModelsConfig()

    def stage_modes(self) -> dict:
        """What each stage did in this run (the card and the funnel say which filters were active)."""
        c = self.consent
        return {"prefilter": "filter", "blocklist": "filter" if c.blocklist else "off",
                "optout": "filter" if (c.robots_txt or c.tdmrep or c.optout_list) else "off", "toxicity": self.toxicity.mode, "download": "filter", "decode": "filter",
                "resize": "filter", "clip": self.clip.clip_mode, "nsfw": self.clip.nsfw_mode, "t5": self.t5.mode,
                **({"dedup": "filter"} if self.dedup.enabled else {})}  # absent when off: older stats.json read the same


# (attribute, --help group title, group description)
SECTIONS = (
    ("input", "input", "the metadata to read; column names default to LAION-400M's"),
    ("output", "output", None),
    ("prefilter", "prefilter (metadata only, before any download)", None),
    ("download", "download", None),
    ("consent", "consent: opt-outs and blocklists", "robots.txt, TDMRep, X-Robots-Tag, C2PA and --optout-list are each on by "
     "default (docs/consent.md); every row they remove is a reject with its own reason"),
    ("image", "decode / resize", None),
    ("toxicity", "caption toxicity", "each model filter is 'filter' (score and reject), 'score' (record scores, reject nothing) or 'off'"),
    ("clip", "CLIP similarity + NSFW", None),
    ("t5", "text embedding (frozen T5, survivors only)", None),
    ("dedup", "deduplication and decontamination (after every filter)", "off unless --dedup or --decontaminate is given"),
    ("models", "model runtime", None),
)


@dataclass(frozen=True)
class Setting:
    section: str
    name: str  # the field's name in its section
    key: str  # flat name: flag, options-file key, stats.json key
    type: Any  # int | float | str | bool | tuple
    default: Any
    required: bool
    meta: dict

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.key.replace("_", "-")


_SECTION_CLASSES = {"input": InputConfig, "output": OutputConfig, "prefilter": PrefilterConfig, "download": DownloadConfig,
                    "consent": ConsentConfig,
                    "image": ImageConfig, "toxicity": ToxicityConfig, "clip": ClipConfig, "t5": T5Config, "dedup": DedupConfig,
                    "models": ModelsConfig}


def settings() -> Iterator[Setting]:
    """Every setting of `kiln prepare`, in --help order."""
    for attr, _, _ in SECTIONS:
        for f in dataclasses.fields(_SECTION_CLASSES[attr]):
            m = f.metadata
            kind = m.get("type") or (bool if isinstance(f.default, bool) else None)
            yield Setting(attr, f.name, m.get("key") or f.name, kind, f.default, bool(m.get("required")), dict(m))


SETTINGS = {s.key: s for s in settings()}
assert len(SETTINGS) == sum(len(dataclasses.fields(c)) for c in _SECTION_CLASSES.values()), "setting keys must be unique"


# -- argparse ------------------------------------------------------------------------------------


def _shown_default(s: Setting) -> str:
    if s.meta.get("shown"):
        return s.meta["shown"]
    if s.type is bool:
        return "on" if s.default else "off"
    if s.type is tuple:
        return ",".join(s.default) if s.default else "none"
    return str(s.default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every setting as a flag. Defaults are SUPPRESSed: the namespace holds only what was
    typed, so an options file's `kiln:` value can sit between the default and the command line."""
    for attr, title, description in SECTIONS:
        group = parser.add_argument_group(title, description)
        for s in (x for x in SETTINGS.values() if x.section == attr):
            help_text = s.meta["help"] + ("" if s.required else f" [{_shown_default(s)}]")
            if s.type is bool:
                action = "store_false" if s.default else "store_true"
                if s.default:  # the flag turns it off
                    help_text = f"turn off: {s.meta['help']} [on]"
                group.add_argument(s.flag, dest=s.key, action=action, default=argparse.SUPPRESS, help=help_text)
                continue
            metavar = s.meta.get("metavar") or {int: "N", float: "X", tuple: "A,B"}.get(s.type)
            if s.meta.get("repeat"):  # a list of files: the flag may be given several times (each may also be A,B)
                group.add_argument(s.flag, dest=s.key, default=argparse.SUPPRESS, help=help_text, action="append",
                                   metavar=metavar)
                continue
            group.add_argument(
                s.flag, dest=s.key, required=s.required, default=argparse.SUPPRESS, help=help_text,
                type=str if s.type is tuple else s.type, choices=s.meta.get("choices"), metavar=metavar,
            )
    parser.add_argument("--options", default=None, metavar="YAML",
                        help="a beam_options/*.yaml file: Beam flags, and kiln defaults under 'kiln:'; flags on the command line win")


# -- values -> config ----------------------------------------------------------------------------


def _coerce(s: Setting, value, where: str):
    """A raw value (typed by argparse, or native YAML) -> the setting's type, or ConfigError."""
    name = f"{where}{s.key}" if where else s.flag
    if value is None:
        if s.default is None or s.required:
            return None
        raise ConfigError(f"{name}: a value is required (default {_shown_default(s)})")
    t = s.type
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if t is tuple:
        if isinstance(value, str):
            return tuple(x.strip() for x in value.split(",") if x.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
            if s.meta.get("repeat"):  # --blocklist A --blocklist B,C
                return tuple(y.strip() for x in value for y in x.split(",") if y.strip())
            return tuple(x.strip() for x in value if x.strip())
        raise ConfigError(f"{name}: expected a comma-separated string or a list of strings, got {value!r}")
    if t is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if t is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _check(s: Setting, value) -> None:
    m = s.meta
    if value is None:
        if s.required:
            raise ConfigError(f"{s.flag} is required")
        return
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{s.flag}: {value!r} is not one of {', '.join(m['choices'])}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{s.flag} {value}: must be a finite number")
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (value < lo or (m.get("lo_open") and value == lo)):
        raise ConfigError(f"{s.flag} {value}: must be {'>' if m.get('lo_open') else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{s.flag} {value}: must be <= {hi}")


def validate(cfg: PrepareConfig) -> PrepareConfig:
    """Ranges, choices and the rules between settings; raises ConfigError with one clear line."""
    for s in SETTINGS.values():
        _check(s, getattr(getattr(cfg, s.section), s.name))
    inp = cfg.input
    for s in ("url_col", "caption_col", "id_col", "width_col", "height_col"):
        if not getattr(inp, s).strip():
            raise ConfigError(f"--{s.replace('_', '-')}: a column name cannot be empty")
    if inp.url_col == inp.caption_col:
        raise ConfigError(f"--url-col and --caption-col name the same column {inp.url_col!r}")
    if cfg.prefilter.min_caption_chars > cfg.prefilter.max_caption_chars:
        raise ConfigError(f"--min-caption-chars {cfg.prefilter.min_caption_chars} is above --max-caption-chars {cfg.prefilter.max_caption_chars}")
    im = cfg.image
    if im.encode_format == "png" and im.encode_quality > 9:
        raise ConfigError(f"--encode-quality {im.encode_quality}: PNG takes a compression level 0-9")
    if im.encode_format != "png" and im.encode_quality < 1:
        raise ConfigError(f"--encode-quality {im.encode_quality}: {im.encode_format} quality is 1-100")
    device = cfg.models.device
    if device is not None and not re.fullmatch(r"(cpu|mps|(cuda|xpu|npu)(:\d+)?)", device):
        raise ConfigError(f"--device {device!r}: give a torch device such as cpu, cuda or cuda:1")
    if cfg.clip.nsfw_mode != "off" and cfg.clip.clip_mode == "off":
        raise ConfigError("--nsfw needs the CLIP image embedding: use --clip score (or filter), or --nsfw off")
    if cfg.clip.nsfw_mode != "off" and not (cfg.clip.nsfw_head or "").strip():
        raise ConfigError("--nsfw needs --nsfw-head HEAD (LAION's CLIP-based NSFW detector for --clip-model: a registry name "
                          "or local:FILE), or --nsfw off")
    dd = cfg.dedup
    unknown = [r for r in dd.dedup if r not in ("exact", "pdq", "semantic")]
    if unknown:
        raise ConfigError(f"--dedup {','.join(unknown)}: not a rule; give a comma-separated list of exact, pdq, semantic")
    if "semantic" in dd.dedup and cfg.clip.clip_mode == "off":
        raise ConfigError("--dedup semantic needs the CLIP image embedding: use --clip score (or filter), or leave semantic out")
    if dd.eval_cosine is not None and not dd.decontaminate:
        raise ConfigError("--decontaminate-cosine needs --decontaminate PATH (the evaluation set)")
    if dd.eval_cosine is not None and cfg.clip.clip_mode == "off":
        raise ConfigError("--decontaminate-cosine needs the dataset's CLIP image embeddings: use --clip score (or filter), "
                          "or match by PDQ only (leave --decontaminate-cosine out)")
    dl = cfg.download
    if dl.per_host_buckets > dl.per_host_concurrency:
        raise ConfigError(f"--per-host-buckets {dl.per_host_buckets} is above --per-host-concurrency {dl.per_host_concurrency}: "
                          "each bucket needs at least one request in flight")
    try:
        cfg.download.fetch_config()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def from_values(values: dict) -> PrepareConfig:
    """Typed flat values (key -> value; absent keys take their defaults) -> a validated config."""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown kiln prepare setting(s) {unknown}")
    sections: dict = {attr: {} for attr in _SECTION_CLASSES}
    for key, value in values.items():
        s = SETTINGS[key]
        sections[s.section][s.name] = value
    cfg = PrepareConfig(**{attr: _SECTION_CLASSES[attr](**kw) for attr, kw in sections.items()})
    return validate(cfg)


def resolve(cli_values: dict, file_values: dict | None = None, *, source: str = "options file") -> PrepareConfig:
    """Defaults < an options file's `kiln:` section < the command line, each value checked."""
    merged = {}
    for key, value in (file_values or {}).items():
        key = str(key).replace("-", "_")
        s = SETTINGS.get(key)
        if s is None or s.required:
            known = sorted(k for k, x in SETTINGS.items() if not x.required)
            raise ConfigError(f"{source}: kiln: {key!r} is not a kiln prepare setting (known: {', '.join(known)})")
        merged[key] = _coerce(s, value, f"{source}: kiln: ")
        try:
            _check(s, merged[key])
        except ConfigError as err:
            raise ConfigError(f"{source}: kiln: {key}: {err}") from None
    for key, value in cli_values.items():
        merged[key] = _coerce(SETTINGS[key], value, "")
    return from_values(merged)


def prepare_parser(prog: str = "kiln prepare") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run the Beam job. Unknown flags go to Beam.")
    add_arguments(p)
    return p


def namespace_values(ns: argparse.Namespace) -> dict:
    """The settings typed on the command line, from a namespace built by add_arguments."""
    return {k: v for k, v in vars(ns).items() if k in SETTINGS}


def parse_prepare(argv: list[str]) -> tuple[PrepareConfig, list[str]]:
    """`kiln prepare` argv -> (config, Beam argv): exactly what the CLI does, as a function."""
    ns, beam_argv = prepare_parser().parse_known_args(list(argv))
    return config_from_namespace(ns, beam_argv)


def config_from_namespace(ns: argparse.Namespace, beam_argv: list[str]) -> tuple[PrepareConfig, list[str]]:
    """Apply the options file named by `--options` (if any) and resolve. Raises ConfigError (bad
    settings) or pipeline.beam_yaml.OptionsFileError (a bad file)."""
    from pipeline.beam_yaml import check_beam_args

    values = namespace_values(ns)
    path = getattr(ns, "options", None)
    kiln_flags = tuple(s.flag for s in SETTINGS.values()) + ("--options",)
    if not path:
        cfg = resolve(values)
        check_beam_args(beam_argv, kiln_flags)
        return cfg, list(beam_argv)
    from pipeline.beam_yaml import load_options_file, merge_beam_args, placeholders, OptionsFileError

    file_argv, kiln_values = load_options_file(path)
    cfg = resolve(values, kiln_values, source=str(path))
    merged = merge_beam_args(file_argv, list(beam_argv))
    left = placeholders(merged)
    if left:
        raise OptionsFileError(f"{path}: replace the placeholder values before submitting (in the file or on the command line): {' '.join(left)}")
    check_beam_args(merged, kiln_flags)
    return cfg, merged


# -- config -> what the run records --------------------------------------------------------------


def flat(cfg: PrepareConfig) -> dict:
    """key -> value for every setting (tuples as lists): stats.json's "flags"."""
    out = {}
    for s in SETTINGS.values():
        v = getattr(getattr(cfg, s.section), s.name)
        out[s.key] = list(v) if isinstance(v, tuple) else v
    return out


def fingerprint(cfg: PrepareConfig, input_files: list[dict], list_hashes: list[str] | None = None) -> str:
    """16 hex chars over every `result` setting, the input files (path, bytes, rows) and the sha256 of
    every --blocklist / --optout-list file (`list_hashes`, in flag order: a list edited in place changes
    what is kept): a partial output is resumed, and a complete one accepted, only under the same fingerprint."""
    values = flat(cfg)
    payload = {"flags": {s.key: values[s.key] for s in SETTINGS.values() if s.meta["result"]},
               "inputs": [[f["path"], f["bytes"], f["rows"]] for f in input_files]}
    if list_hashes:
        payload["lists"] = list(list_hashes)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def command_argv(cfg: PrepareConfig, beam_argv: list[str] = ()) -> list[str]:
    """`kiln prepare` argv that reproduces this config: --input, --output, every setting that
    differs from its default (in --help order; --overwrite and --quiet left out), then Beam's flags."""
    argv = ["--input", cfg.input.input, "--output", cfg.output.output]
    for s in SETTINGS.values():
        if s.required or s.key in ("overwrite", "quiet"):
            continue
        v = getattr(getattr(cfg, s.section), s.name)
        if v == s.default:
            continue
        if s.type is bool:
            argv.append(s.flag)
        elif s.type is tuple and s.meta.get("repeat"):
            for item in v:
                argv += [s.flag, item]
        elif s.type is tuple:
            argv.append(f"{s.flag}={','.join(v)}")
        else:
            argv += [s.flag, str(v)]
    return argv + list(beam_argv)


def command_line(cfg: PrepareConfig, beam_argv: list[str] = ()) -> str:
    return shlex.join(["kiln", "prepare", *command_argv(cfg, beam_argv)])
