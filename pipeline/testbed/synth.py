"""The synthetic web: LAION-400M-style metadata whose URLs point at a local HTTP server, with planted
failures whose expected pipeline outcome is written down, so the pipeline can be tested end to end
without the internet.

`synthesize` writes a directory:

    metadata.parquet     LAION-400M's columns and dtypes (`LAION_SCHEMA`); the pipeline's input
    ground_truth.parquet per row: planted `kind`, expected (stage, reason), what the image shows
    images/              every file a server may send; a name is the last path segment of its URL
    routes.json          request target ("/name.ext" or "/name.ext?hop=N") -> behaviour (server.py's `_Handler`)
    web.json             base_url, ports (main and auxiliary listeners), seed, rows, failure_rate, kinds

`pipeline.testbed.server` (`serve`, class `SynthServer`) serves such a directory on 127.0.0.1.

Images are drawn, not downloaded: a background colour and zero to three shapes whose colours and
positions the caption states truthfully, so a trained model's samples can be checked against it.
Everything is a function of the seed (and base_url, which is part of every URL).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import math
import random
import shutil
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.records import STAGE_BLOCKLIST, STAGE_DECODE, STAGE_DOWNLOAD, STAGE_OPTOUT, STAGE_PREFILTER, compute_uid

LAION_SCHEMA = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("HEIGHT", pa.int64()),
        ("WIDTH", pa.int64()),
        ("LICENSE", pa.string()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
    ]
)

GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("uid", pa.string()),  # records.compute_uid(URL, TEXT): the key rejects and shards use
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("kind", pa.string()),
        ("expected_stage", pa.string()),  # null: the row is expected to be kept
        ("expected_reason", pa.string()),
        ("background", pa.string()),
        ("shapes", pa.string()),  # JSON list of {"shape", "colour", "position", "bbox": [x0, y0, x1, y1]}
        ("true_width", pa.int64()),  # pixel size of the image the URL leads to; null where none
        ("true_height", pa.int64()),
        ("format", pa.string()),  # "jpeg" / "png" / "webp"; null where no image is reachable
        ("image_file", pa.string()),  # the file under images/ holding those pixels
    ]
)

# Colour words with fixed, well-separated RGB values; captions use only these colour words.
COLOURS = {
    "red": (220, 30, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 40),
    "orange": (245, 135, 25),
    "purple": (125, 45, 165),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star")
FORMATS = ("jpeg", "png", "webp")
FORMAT_WEIGHTS = {"jpeg": 60, "png": 25, "webp": 15}
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}

MAX_LONG_SIDE = 1600
ASPECT_RANGE = (0.6, 1.8)  # width / height of ordinary images
BOMB_SIDE = 20_000  # 400 MP: above the pipeline's 178,956,970-pixel limit (2 x Pillow's default)
EXTREME_SIZE = (1600, 200)  # aspect 8: beyond the pipeline's 3.0
LIAR_DECLARED = (512, 512)  # what the metadata claims for too_small / decompression_bomb
LONG_CAPTION_CHARS = 5000  # pipeline's limit is 1000
DRIP = {"length": 200 * 1024, "chunk": 64, "interval": 0.2}  # ~320 B/s: 10 minutes for the body
RETRY_AFTER = "1"

_P, _D, _X = STAGE_PREFILTER, STAGE_DOWNLOAD, STAGE_DECODE
# kind -> (expected_stage, expected_reason); (None, None) = kept. Failure rows cycle through the
# kinds in this order, so with fewer failure rows than kinds only the first ones appear.
EXPECTED: dict[str, tuple[str | None, str | None]] = {
    "ok": (None, None),
    "http_404": (_D, "http_404"),
    "http_410": (_D, "http_410"),
    "http_500": (_D, "http_500"),
    "retry_429": (None, None),
    "retry_503": (None, None),
    "slow_drip": (_D, "timeout"),
    "stall": (_D, "timeout"),
    "truncated_jpeg": (_X, "truncated"),
    "html_as_jpeg": (_X, "not_an_image"),
    "zero_bytes": (_D, "empty_body"),
    "too_small": (_X, "too_small"),
    "too_small_declared": (_P, "declared_too_small"),
    "extreme_aspect": (_X, "aspect_ratio"),
    "decompression_bomb": (_X, "decompression_bomb"),
    "redirect_chain": (None, None),
    "redirect_loop": (_D, "too_many_redirects"),
    "redirect_other_port": (_D, "private_address"),
    "redirect_127_0_0_2": (_D, "private_address"),
    "redirect_ipv6_loopback": (_D, "private_address"),
    "robots_noai": (_D, "robots_noai"),
    "robots_noimageai": (_D, "robots_noimageai"),
    "robots_otherbot": (None, None),
    "duplicate": (_P, "duplicate"),
    "url_null": (_P, "url_missing"),
    "url_empty": (_P, "url_missing"),
    "url_file": (_P, "url_scheme"),
    "url_ftp": (_P, "url_scheme"),
    "url_data": (_P, "url_scheme"),
    "caption_empty": (_P, "caption_empty"),
    "caption_whitespace": (_P, "caption_empty"),
    "caption_long": (_P, "caption_too_long"),
    # Beyond the original table: the rest of records.py's vocabulary that a metadata row can trigger.
    "caption_null": (_P, "caption_missing"),
    "caption_short": (_P, "caption_too_short"),
    "url_invalid": (_P, "url_invalid"),
    "declared_aspect": (_P, "declared_aspect_ratio"),
    "robots_noindex": (_D, "robots_noindex"),
    "robots_noimageindex": (_D, "robots_noimageindex"),
}
# Rows the model filters must catch, planted at their own rates (mismatch_rate, toxic_rate) among
# rows that are otherwise ok: with a filter off (or score-only) they are kept.
FILTER_KINDS: dict[str, tuple[str, str]] = {
    "mismatched_caption": ("clip", "clip_similarity_low"),  # the caption of an unrelated scene
    "toxic_caption": ("toxicity", "toxic"),  # a true caption with a held-out toxic phrase added
}
FAILURE_KINDS = tuple(k for k in EXPECTED if k != "ok")
EXPECTED.update(FILTER_KINDS)

# The consent web (`consent_per_kind` > 0): opt-out protocols and blocklists planted on the main
# listener and on extra sites (127.0.0.1 ports; "localhost" is reached by name), each row's outcome
# assuming the run's defaults plus the web's own --blocklist and --optout-list (SynthWeb.consent_flags).
# kind -> (site (None: main), path template ({name}: the image file's name), expected stage, reason)
_B, _O = STAGE_BLOCKLIST, STAGE_OPTOUT
CONSENT_KINDS: dict[str, tuple] = {
    "robots_kiln_disallow": (None, "/kiln-no/{name}", _O, "robotstxt_disallowed"),
    "robots_allow_override": (None, "/kiln-no/yes/{name}", None, None),  # Allow's longer match wins
    "robots_wildcard_end": (None, "/w/{name}.noai", _O, "robotstxt_disallowed"),  # Disallow: /w/*.noai$
    "robots_wildcard_query": (None, "/w/{name}.noai?v=1", None, None),  # `$` anchors: a query escapes it
    "robots_ai_optout": (None, "/ai-no/{name}", _O, "robotstxt_ai_optout"),  # CCBot/GPTBot's own group
    "robots_star_ignored": (None, "/star-only/{name}", None, None),  # `*` rules: kiln has its own group here
    "tdmrep_reserved": (None, "/tdm/{name}", _O, "tdmrep_reserved"),
    "tdmrep_open": (None, "/tdm/open/{name}", None, None),  # an earlier tdmrep.json rule with reservation 0
    "tdm_header": (None, "/{name}", _D, "tdm_reservation"),
    "optout_listed": (None, "/listed/{name}", _O, "optout_list"),
    "robots_star_disallow": ("star", "/nope/{name}", _O, "robotstxt_disallowed"),
    "robots_star_allow": ("star", "/nope/ok/{name}", None, None),
    "robots_404": ("norules", "/{name}", None, None),
    "robots_500": ("broken", "/{name}", _O, "robotstxt_unavailable"),
    "robots_slow": ("slow", "/{name}", None, None),
    "robots_slow_disallow": ("slow", "/slow-no/{name}", _O, "robotstxt_disallowed"),
    "tdmrep_500": ("tdm500", "/{name}", _O, "tdmrep_unavailable"),
    "blocklist_sample_id": (None, "/{name}", _B, "blocklist_sample_id"),
    "blocklist_url_sha256": (None, "/{name}", _B, "blocklist_url_sha256"),
    "blocklist_url_md5": (None, "/{name}", _B, "blocklist_url_md5"),
    "blocklist_domain": ("localhost", "/{name}", _B, "blocklist_domain"),
    "blocklist_image_sha256": (None, "/{name}", _X, "blocklist_image_sha256"),
    "blocklist_image_md5": (None, "/{name}", _X, "blocklist_image_md5"),
    "blocklist_pdq": (None, "/{name}", _X, "blocklist_pdq"),  # the list has the original's PDQ; a re-encoded, resized copy is served
    "c2pa_not_allowed": (None, "/{name}", _X, "c2pa_not_allowed"),  # a signed JPEG: c2pa.ai_training notAllowed
    "c2pa_allowed": (None, "/{name}", None, None),  # a signed JPEG: ai_training allowed, ai_inference notAllowed
}
EXPECTED.update({k: (v[2], v[3]) for k, v in CONSENT_KINDS.items()})
CONSENT_SITES = ("star", "norules", "broken", "slow", "tdm500", "localhost")
SLOW_RULES_S = 1.5  # the slow site's robots.txt arrives after this long: slow is not unavailable
BLOCKLIST_FILE, OPTOUT_FILE = "blocklist.txt", "optout.txt"
MAIN_ROBOTS = """# the synthetic web's main site
User-agent: *
Disallow: /star-only/

User-agent: kiln
Disallow: /kiln-no/
Allow: /kiln-no/yes/
Disallow: /w/*.noai$

User-agent: CCBot
User-agent: GPTBot
Disallow: /ai-no/

User-agent: Google-Extended
Allow: /
"""
MAIN_TDMREP = [
    {"location": "/tdm/open/*", "tdm-reservation": 0},
    {"location": "/tdm/*", "tdm-reservation": 1, "tdm-policy": "https://tdm.example/policy.json"},
]
SITE_ROBOTS = {"star": "User-agent: *\nDisallow: /nope/\nAllow: /nope/ok/\n", "slow": "User-agent: *\nDisallow: /slow-no/\n"}


def site_host(name: str) -> str:
    """The host name a consent site's URLs use: "localhost" for that site, 127.0.0.1 for the rest."""
    return "localhost" if name == "localhost" else "127.0.0.1"

_ROBOTS = {
    "robots_noai": "noai",
    "robots_noimageai": "noimageai",
    "robots_otherbot": "otherbot: noai",
    "robots_noindex": "noindex",
    "robots_noimageindex": "noimageindex",
}
_FIXED_URLS = {"url_null": None, "url_empty": "", "url_file": "file:///etc/passwd", "url_ftp": "ftp://127.0.0.1/x.jpg"}
_CAPTION_OVERRIDES = {"caption_null": None, "caption_empty": "", "caption_whitespace": "   \t ", "caption_short": "ab"}
_NO_IMAGE = {"http_404", "http_410", "http_500", "slow_drip", "stall", "html_as_jpeg", "zero_bytes", "redirect_loop"}
_NO_IMAGE |= {"url_null", "url_empty", "url_file", "url_ftp", "url_data", "url_invalid"}

_TEMPLATES = (
    "{}",
    "{}",
    "a photo of {}",
    "an illustration of {}",
    "{}, digital art",
    "a simple drawing of {}",
    "{}, flat vector art",
    "clip art of {}",
    "a minimalist poster showing {}",
    "{} - stock image",
)
_PLAIN = "a plain {} background"  # the description of a scene with no shapes (the planted bomb's)
_LICENSES = (
    "https://creativecommons.org/licenses/by/4.0/",
    "https://creativecommons.org/licenses/by-sa/4.0/",
    "https://creativecommons.org/licenses/by-nc/2.0/",
    "https://creativecommons.org/publicdomain/zero/1.0/",
)
_HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Photo</title></head><body><p>This image has moved.</p></body></html>\n"


@dataclass(frozen=True)
class SynthWeb:
    """A synthesized directory, as described by its web.json."""

    root: Path
    base_url: str
    port: int
    aux_port: int  # 127.0.0.1, another port
    alt_loopback_port: int  # 127.0.0.2
    ipv6_port: int  # ::1
    seed: int
    rows: int
    failure_rate: float
    kinds: dict
    sites: dict = None  # consent web: site name -> 127.0.0.1 port (CONSENT_SITES); {} without one

    @property
    def metadata_path(self) -> Path:
        return self.root / "metadata.parquet"

    @property
    def ground_truth_path(self) -> Path:
        return self.root / "ground_truth.parquet"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def allow_hosts(self) -> str:
        """The pipeline's --allow-hosts value: the main listener and the consent web's sites, never
        the auxiliary listeners."""
        hosts = [f"{urlsplit(self.base_url).hostname}:{self.port}"]
        hosts += [f"{site_host(name)}:{port}" for name, port in sorted((self.sites or {}).items())]
        return ",".join(hosts)

    @property
    def consent_flags(self) -> list[str]:
        """The `kiln prepare` flags the consent web's ground truth assumes: its --blocklist and
        --optout-list files ([] for a web without consent rows)."""
        if not self.sites:
            return []
        return ["--blocklist", str(self.root / BLOCKLIST_FILE), "--optout-list", str(self.root / OPTOUT_FILE)]

    @property
    def duplicates(self) -> list[dict]:
        """The planted duplicates (dupes_per_kind): [{"uid", "SAMPLE_ID", "of_uid", "of_SAMPLE_ID", "how"}]."""
        path = self.root / DUPES_FILE
        return json.loads(path.read_text()) if path.exists() else []

    def site_url(self, name: str) -> str:
        return f"http://{site_host(name)}:{self.sites[name]}"

    @classmethod
    def load(cls, root: str | Path) -> SynthWeb:
        root = Path(root)
        meta = json.loads((root / "web.json").read_text())
        fields = ("base_url", "port", "aux_port", "alt_loopback_port", "ipv6_port", "seed", "rows", "failure_rate", "kinds")
        return cls(root=root, sites=meta.get("sites") or {}, **{k: meta[k] for k in fields})


# --------------------------------------------------------------------------------------------
# Generation


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _free_ports(reserved: int | None, extra: int = 0) -> tuple[int, int, int, int, list[int]]:
    """(main, aux, 127.0.0.2, ::1, [`extra` more 127.0.0.1 ports]) free right now, none equal to
    `reserved` (base_url's port).

    All sockets stay open until every port is read so the 127.0.0.1 ports differ. Where
    127.0.0.2 or ::1 cannot be bound, a 127.0.0.1 port stands in: the Location still names that
    address, nothing will listen there, and the guard must reject it all the same.
    """
    socks = []

    def grab(family, host, port=0):
        s = socket.socket(family, socket.SOCK_STREAM)
        socks.append(s)
        try:
            s.bind((host, port))
        except OSError:
            return None
        return s.getsockname()[1]

    try:
        if reserved:
            grab(socket.AF_INET, "127.0.0.1", reserved)
        main, aux = grab(socket.AF_INET, "127.0.0.1"), grab(socket.AF_INET, "127.0.0.1")
        alt = grab(socket.AF_INET, "127.0.0.2") or grab(socket.AF_INET, "127.0.0.1")
        v6 = (grab(socket.AF_INET6, "::1") if socket.has_ipv6 else None) or grab(socket.AF_INET, "127.0.0.1")
        return main, aux, alt, v6, [grab(socket.AF_INET, "127.0.0.1") for _ in range(extra)]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class _Picture:
    """What to draw and how to encode it; rendering needs no RNG, so it can run in threads."""

    width: int
    height: int
    background: str
    shapes: tuple  # of dicts with shape, colour, position, bbox
    fmt: str
    quality: int
    texture: int | None = None  # planted duplicates' originals: a seeded low-frequency texture, so PDQ has detail to hash

    def render(self) -> Image.Image:
        img = self._render_flat()
        if self.texture is None:
            return img
        # +-40 levels of 8x8-cell noise, upsampled smoothly: survives resizing and re-encoding, as
        # photographs' structure does (the flat drawings alone are mostly below PDQ's quality 50).
        cells = np.random.default_rng(self.texture).uniform(-40, 40, (8, 8)).astype(np.float32)
        noise = np.asarray(Image.fromarray(cells, mode="F").resize((self.width, self.height), Image.BICUBIC))
        a = np.asarray(img).astype(np.float32) + noise[..., None]
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    def _render_flat(self) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), COLOURS[self.background])
        draw = ImageDraw.Draw(img)
        # A gentle vertical shading (at most 12% darker): keeps files from being perfectly flat
        # without making the background colour ambiguous.
        r, g, b = COLOURS[self.background]
        band = max(1, self.height // 64)
        for y in range(0, self.height, band):
            f = 1.0 - 0.12 * y / self.height
            draw.rectangle((0, y, self.width, y + band), fill=(int(r * f), int(g * f), int(b * f)))
        for s in self.shapes:
            _draw_shape(draw, s["shape"], s["bbox"], COLOURS[s["colour"]])
        return img

    def encode(self) -> bytes:
        buf = io.BytesIO()
        img = self.render()
        if self.fmt == "jpeg":
            img.save(buf, "JPEG", quality=self.quality)
        elif self.fmt == "png":
            img.save(buf, "PNG")
        else:
            img.save(buf, "WEBP", quality=self.quality, method=2)  # method 2: ~3x faster than the default
        return buf.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox, fill) -> None:
    x0, y0, x1, y1 = bbox
    if shape == "circle":
        draw.ellipse(bbox, fill=fill)
    elif shape == "square":
        draw.rectangle(bbox, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # five-pointed star
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)


def _bomb_idat(side: int) -> bytes:
    """zlib stream of a side x side 1-bit image of zeros (~48 KB for 20000^2; 400 MP when decoded)."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    block = row * 500
    parts = [comp.compress(block) for _ in range(side // 500)]
    parts.append(comp.compress(row * (side % 500)))
    parts.append(comp.flush())
    return b"".join(parts)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _bomb_png(idat: bytes, side: int, colour: str) -> bytes:
    """A valid palette PNG, every pixel the given colour, whose header declares side x side."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0)  # bit depth 1, palette
    plte = bytes(COLOURS[colour]) + bytes(COLOURS[colour])
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"PLTE", plte) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


class _Planner:
    """Draws every random choice, in row order, from one seeded RNG."""

    def __init__(self, rng, base_url, ports, min_size, size_range, formats):
        self.rng = rng
        self.base_url = base_url
        self.aux_port, self.alt_port, self.v6_port = ports
        self.min_size = min_size
        self.size_range = size_range
        self.formats = formats
        self.tokens: set[str] = set()
        self.keys: set[tuple] = set()  # (URL, TEXT) pairs: only planted duplicates may repeat one
        self.routes: dict[str, dict] = {}
        self.files: dict[str, object] = {}  # name under images/ -> _Picture or bytes
        self.blocklist: list[tuple[str, str]] = []  # (kind, value) entries the consent rows plant
        # 5/8 and 1/2 of the limit: 40x40 and 40x32 at the default 64.
        self.tiny = max(4, min_size * 5 // 8)

    # -- random pieces ------------------------------------------------------------------------

    def token(self) -> str:
        while True:
            t = f"{self.rng.getrandbits(48):012x}"
            if t not in self.tokens:
                self.tokens.add(t)
                return t

    def size(self) -> tuple[int, int]:
        rng = self.rng
        aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))  # width / height
        if self.size_range:
            long = rng.randint(*self.size_range)
            short = max(self.min_size, round(long / max(aspect, 1 / aspect)))
        else:
            # LAION-like: mostly 256-900 px on the short side, ~17% at 1024 px or more.
            short = rng.randint(1024, 1200) if rng.random() < 0.17 else rng.randint(max(256, self.min_size), 900)
            long = min(MAX_LONG_SIDE, round(short * max(aspect, 1 / aspect)))
        return (long, short) if aspect >= 1 else (short, long)

    def fmt(self) -> str:
        return self.rng.choices(self.formats, weights=[FORMAT_WEIGHTS[f] for f in self.formats])[0]

    def quality(self, fmt: str) -> int:
        return self.rng.randint(80, 95) if fmt == "jpeg" else self.rng.randint(75, 90)

    def scene(self, w: int, h: int, n_shapes: int | None = None) -> tuple[str, list[dict], str]:
        """(background, shapes, description) with relations true to the drawing."""
        rng = self.rng
        if n_shapes is None:
            n_shapes = rng.choices((1, 2, 3), weights=(35, 40, 25))[0]
        colours = rng.sample(list(COLOURS), n_shapes + 1)
        bg, shape_colours = colours[0], colours[1:]
        shape_kinds = [rng.choice(SHAPES) for _ in range(n_shapes)]
        short = min(w, h)
        if n_shapes == 0:
            return bg, [], _PLAIN.format(bg)
        if n_shapes == 1:
            pos = rng.choice(("center", "left", "right", "top", "bottom"))
            frac = {
                "center": (0.25, 0.25, 0.75, 0.75),
                "left": (0, 0, 0.45, 1),
                "right": (0.55, 0, 1, 1),
                "top": (0, 0, 1, 0.45),
                "bottom": (0, 0.55, 1, 1),
            }[pos]
            regions, fill = [(pos, frac)], (0.6, 0.9)
        elif n_shapes == 2:
            if rng.random() < 0.5:
                regions = [("left", (0, 0, 0.47, 1)), ("right", (0.53, 0, 1, 1))]
            else:
                regions = [("top", (0, 0, 1, 0.47)), ("bottom", (0, 0.53, 1, 1))]
            fill = (0.6, 0.9)
        else:
            # Three in a row along the longer side; thirds with gaps so no two shapes touch.
            thirds = ((0, 0.31), (0.345, 0.655), (0.69, 1))
            if w >= h:
                regions = [(p, (a, 0, b, 1)) for p, (a, b) in zip(("left", "center", "right"), thirds)]
            else:
                regions = [(p, (0, a, 1, b)) for p, (a, b) in zip(("top", "center", "bottom"), thirds)]
            fill = (0.68, 0.92)  # 0.68 x 0.31 keeps every shape above 1/5 of the shorter side
        shapes = []
        for (pos, (fx0, fy0, fx1, fy1)), kind, colour in zip(regions, shape_kinds, shape_colours):
            rx0, ry0, rx1, ry1 = fx0 * w, fy0 * h, fx1 * w, fy1 * h
            s = int(rng.uniform(*fill) * min(rx1 - rx0, ry1 - ry0))
            x0 = int(rx0 + rng.uniform(0, rx1 - rx0 - s))
            y0 = int(ry0 + rng.uniform(0, ry1 - ry0 - s))
            shapes.append({"shape": kind, "colour": colour, "position": pos, "bbox": [x0, y0, x0 + s, y0 + s]})

        def phrase(s, size_word=""):
            first = size_word or s["colour"]
            return f"{_article(first)} {size_word + ' ' if size_word else ''}{s['colour']} {s['shape']}"

        if n_shapes == 1:
            s = shapes[0]
            ratio = (s["bbox"][2] - s["bbox"][0]) / short
            size_word = "small" if ratio < 0.33 else "large" if ratio > 0.55 else ""
            where = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
            desc = f"{phrase(s, size_word)} {where[s['position']]}"
        elif n_shapes == 2:
            a, b = shapes if rng.random() < 0.5 else shapes[::-1]
            rel = {"left": "on the left of", "right": "on the right of", "top": "above", "bottom": "below"}[a["position"]]
            desc = f"{phrase(a)} {rel} {phrase(b)}"
        else:
            order = "from left to right" if w >= h else "from top to bottom"
            desc = f"{phrase(shapes[0])}, {phrase(shapes[1])} and {phrase(shapes[2])} {order}"
        return bg, shapes, f"{desc} on {_article(bg)} {bg} background"

    def unrelated_description(self, w: int, h: int, bg: str, shapes: list[dict]) -> str:
        """A description of another scene sharing no colour with this one (a planted mismatch)."""
        used = {bg} | {s["colour"] for s in shapes}
        while True:
            other_bg, other_shapes, desc = self.scene(w, h)
            if not ({other_bg} | {s["colour"] for s in other_shapes}) & used:
                return desc

    def caption(self, desc: str) -> str:
        text = self.rng.choice(_TEMPLATES).format(desc)
        return text[0].upper() + text[1:] if self.rng.random() < 0.4 else text

    # -- rows -----------------------------------------------------------------------------------

    def row(self, kind: str, sample_id: int) -> tuple[dict, dict]:
        """(metadata row, ground-truth row) for one planted kind (not "duplicate")."""
        rng = self.rng
        fmt = "jpeg" if kind in ("truncated_jpeg", "html_as_jpeg") else "png" if kind == "decompression_bomb" else self.fmt()
        if kind in ("too_small", "too_small_declared"):
            w, h = (self.tiny, self.tiny) if kind == "too_small" else (self.tiny, self.tiny * 4 // 5)
        elif kind in ("extreme_aspect", "declared_aspect"):
            w, h = EXTREME_SIZE
        else:
            w, h = self.size()
        declared = {"too_small": LIAR_DECLARED, "decompression_bomb": LIAR_DECLARED, "extreme_aspect": (600, 600)}.get(kind, (w, h))
        if kind == "ok" and rng.random() < 0.02:
            declared = (None, None)  # LAION has rows without sizes; they must pass the prefilter
        while True:  # redraw until (URL, TEXT) is new: rows with a fixed URL could otherwise collide
            bg, shapes, desc = self.scene(w, h, 0 if kind == "decompression_bomb" else None)
            name = f"{self.token()}.{EXTENSIONS[fmt]}"
            url = _FIXED_URLS.get(kind, f"{self.base_url}/{name}")
            if kind == "url_data":
                url = "data:image/png;base64," + base64.b64encode(_tiny_png(bg)).decode()
            elif kind == "url_invalid":
                url = f"http:///{name}"
            if kind == "mismatched_caption":
                text = self.caption(self.unrelated_description(w, h, bg, shapes))
            elif kind == "toxic_caption":
                from pipeline.testbed.toxic_captions import toxic_caption

                text = toxic_caption(rng, self.caption(desc), heldout=True)
            else:
                text = _CAPTION_OVERRIDES.get(kind, self.caption(desc))
            if kind == "caption_long":
                text = ((text + ". ") * (LONG_CAPTION_CHARS // len(text) + 1))[:LONG_CAPTION_CHARS]
            if (url, text) not in self.keys:
                self.keys.add((url, text))
                break

        has_image = kind not in _NO_IMAGE
        path = f"/{name}"
        if kind == "decompression_bomb":
            self.files[name] = ("bomb", bg)
            w = h = BOMB_SIDE
        elif has_image:
            picture = _Picture(w, h, bg, tuple(shapes), fmt, self.quality(fmt))
            self.files[name] = ("truncate", picture) if kind == "truncated_jpeg" else picture
        self._route(kind, path, name, fmt)

        meta = {
            "SAMPLE_ID": sample_id,
            "URL": url,
            "TEXT": text,
            "HEIGHT": declared[1],
            "WIDTH": declared[0],
            "LICENSE": "?" if rng.random() < 0.9 else rng.choice(_LICENSES),
            "NSFW": rng.choices(("UNLIKELY", "UNSURE", "NSFW"), weights=(92, 6, 2))[0],
            "similarity": round(rng.uniform(0.28, 0.45), 7),
        }
        stage, reason = EXPECTED[kind]
        truth = {
            "SAMPLE_ID": sample_id,
            "uid": compute_uid(url, text),
            "URL": url,
            "TEXT": text,
            "kind": kind,
            "expected_stage": stage,
            "expected_reason": reason,
            "background": bg,
            "shapes": json.dumps(shapes),
            "true_width": w if has_image else None,
            "true_height": h if has_image else None,
            "format": fmt if has_image else None,
            "image_file": name if has_image else None,
        }
        return meta, truth

    def consent_row(self, kind: str, sample_id: int, sites: dict) -> tuple[dict, dict]:
        """(metadata row, ground-truth row) of a CONSENT_KINDS row: an ordinary picture served at the
        kind's path on its site; fills self.blocklist with the entries that must catch it."""
        site, template, stage, reason = CONSENT_KINDS[kind]
        w, h = self.size()
        fmt = "jpeg" if kind in ("blocklist_pdq", "c2pa_not_allowed", "c2pa_allowed") else self.fmt()
        bg, shapes, desc = self.scene(w, h)
        name = f"{self.token()}.{EXTENSIONS[fmt]}"
        target = template.format(name=name)
        origin = self.base_url if site is None else f"http://{site_host(site)}:{sites[site]}"
        url = origin + target
        text = self.caption(desc)
        self.keys.add((url, text))
        picture = _Picture(w, h, bg, tuple(shapes), fmt, self.quality(fmt))
        if kind in ("blocklist_image_sha256", "blocklist_image_md5"):
            data = picture.encode()
            self.files[name] = data
            digest = hashlib.sha256(data) if kind.endswith("sha256") else hashlib.md5(data)
            self.blocklist.append((kind[len("blocklist_"):], digest.hexdigest()))
        elif kind == "blocklist_pdq":
            from pipeline.blocklist import pdq_of

            img = picture.render()
            self.blocklist.append(("pdq", pdq_of(np.asarray(img), bgr=False)[0]))
            copy = img.resize((max(8, w * 3 // 4), max(8, h * 3 // 4)), Image.BILINEAR)
            buf = io.BytesIO()
            copy.save(buf, "JPEG", quality=60)
            self.files[name] = buf.getvalue()  # what is served: re-encoded and resized, a different sha256
            w, h = copy.size
        elif kind.startswith("c2pa_"):
            from pipeline.testbed.c2pa_sign import sign, training_mining

            use = "notAllowed" if kind == "c2pa_not_allowed" else "allowed"
            self.files[name] = sign(picture.encode(), "image/jpeg",
                                    [training_mining(c2pa_ai_training=use, c2pa_ai_inference="notAllowed")])
        else:
            self.files[name] = picture
        if kind == "blocklist_sample_id":
            self.blocklist.append(("sample_id", str(sample_id)))
        elif kind == "blocklist_url_sha256":
            self.blocklist.append(("url_sha256", hashlib.sha256(url.encode("utf-8")).hexdigest()))
        elif kind == "blocklist_url_md5":
            self.blocklist.append(("url_md5", hashlib.md5(url.encode("utf-8")).hexdigest()))
        elif kind == "blocklist_domain":
            self.blocklist.append(("domain", site_host(site)))
        route = {"file": name, "content_type": CONTENT_TYPES[fmt]}
        if kind == "tdm_header":
            route["headers"] = {"tdm-reservation": "1", "tdm-policy": "https://tdm.example/policy.json"}
        self.routes[("" if site is None else f"@{site}") + target] = route
        meta = {"SAMPLE_ID": sample_id, "URL": url, "TEXT": text, "HEIGHT": h, "WIDTH": w, "LICENSE": "?",
                "NSFW": "UNLIKELY", "similarity": round(self.rng.uniform(0.28, 0.45), 7)}
        truth = {"SAMPLE_ID": sample_id, "uid": compute_uid(url, text), "URL": url, "TEXT": text, "kind": kind,
                 "expected_stage": stage, "expected_reason": reason, "background": bg, "shapes": json.dumps(shapes),
                 "true_width": w, "true_height": h, "format": fmt, "image_file": name}
        return meta, truth

    def consent_files(self, sites: dict) -> None:
        """robots.txt and tdmrep.json of the main site and of every consent site (routes + files)."""
        self.files["robots-main.txt"] = MAIN_ROBOTS.encode()
        self.routes["/robots.txt"] = {"file": "robots-main.txt", "content_type": "text/plain"}
        self.files["tdmrep-main.json"] = json.dumps(MAIN_TDMREP, indent=1).encode()
        self.routes["/.well-known/tdmrep.json"] = {"file": "tdmrep-main.json", "content_type": "application/json"}
        for site, text in SITE_ROBOTS.items():
            self.files[f"robots-{site}.txt"] = text.encode()
            self.routes[f"@{site}/robots.txt"] = {"file": f"robots-{site}.txt", "content_type": "text/plain"}
        self.routes["@slow/robots.txt"]["delay"] = SLOW_RULES_S
        self.routes["@broken/robots.txt"] = {"status": 500}
        self.routes["@tdm500/.well-known/tdmrep.json"] = {"status": 500}

    def _route(self, kind: str, path: str, name: str, fmt: str) -> None:
        """Add the routes.json entries that make `path` behave as `kind`."""
        file = {"file": name, "content_type": CONTENT_TYPES[fmt]}
        if kind in ("http_404", "http_410", "http_500"):
            self.routes[path] = {"status": int(kind[-3:])}
        elif kind in ("retry_429", "retry_503"):
            self.routes[path] = {**file, "first": {"status": int(kind[-3:]), "headers": {"Retry-After": RETRY_AFTER}}}
        elif kind == "slow_drip":
            self.routes[path] = {"drip": dict(DRIP), "content_type": CONTENT_TYPES[fmt]}
        elif kind == "stall":
            self.routes[path] = {"stall": True}
        elif kind in ("html_as_jpeg", "zero_bytes"):
            # A file named .jpg that is HTML (or empty), served as image/jpeg, as misconfigured sites do.
            self.files[name] = _HTML_PAGE if kind == "html_as_jpeg" else b""
            self.routes[path] = {"file": name, "content_type": "image/jpeg"}
        elif kind == "redirect_chain":
            # 302 (absolute) -> 301 (relative Location, as many servers send) -> 307 (absolute) -> image
            self.routes[path] = {"status": 302, "location": f"{self.base_url}{path}?hop=1"}
            self.routes[f"{path}?hop=1"] = {"status": 301, "location": f"{path}?hop=2"}
            self.routes[f"{path}?hop=2"] = {"status": 307, "location": f"{self.base_url}{path}?hop=3"}
            self.routes[f"{path}?hop=3"] = file
        elif kind == "redirect_loop":
            self.routes[path] = {"status": 302, "loop": True}
        elif kind == "redirect_other_port":
            self.routes[path] = {"status": 302, "location": f"http://127.0.0.1:{self.aux_port}{path}"}
        elif kind == "redirect_127_0_0_2":
            self.routes[path] = {"status": 302, "location": f"http://127.0.0.2:{self.alt_port}{path}"}
        elif kind == "redirect_ipv6_loopback":
            self.routes[path] = {"status": 302, "location": f"http://[::1]:{self.v6_port}{path}"}
        elif kind in _ROBOTS:
            self.routes[path] = {**file, "headers": {"X-Robots-Tag": _ROBOTS[kind]}}
        elif kind not in _NO_IMAGE:
            # ok, the size/format failures, and caption/declared-size rows (which a broken prefilter
            # would let through to a real image).
            self.routes[path] = file


def caption_forms(description: str) -> list[str]:
    """Every caption `_Planner.caption` can make of `description` (each template, as is and capitalised)."""
    out: list[str] = []
    for template in _TEMPLATES:
        text = template.format(description)
        for form in (text, text[0].upper() + text[1:]):
            if form not in out:
                out.append(form)
    return out


def plain_background_captions() -> list[str]:
    """Every caption a scene without shapes can get ("Clip art of a plain white background", ...):
    only planted decompression bombs have one, so a model trained on "ok" rows never sees them."""
    return [c for colour in COLOURS for c in caption_forms(_PLAIN.format(colour))]


def _tiny_png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), COLOURS[colour]).save(buf, "PNG")
    return buf.getvalue()


class SynthArgumentError(ValueError):
    """An argument of `synthesize` out of its range (the `kiln synth` command says it in one line)."""


def synthesize(
    out_dir: str | Path,
    rows: int,
    seed: int = 0,
    failure_rate: float = 0.3,
    base_url: str | None = None,
    min_size: int = 64,
    size_range: tuple[int, int] | None = None,
    formats: tuple[str, ...] = FORMATS,
    mismatch_rate: float = 0.0,
    toxic_rate: float = 0.0,
    consent_per_kind: int = 0,
    dupes_per_kind: int = 0,
) -> SynthWeb:
    """Write a synthetic web into `out_dir` (see the module docstring) and return its description.

    round(rows * failure_rate) rows (capped at rows - 1, so a planted duplicate always has an "ok"
    original) cycle through FAILURE_KINDS in order; every kind appears once that count reaches
    len(FAILURE_KINDS). The rest are "ok". `min_size` is the pipeline's --min-image-size the planted
    too-small images undercut (40 px at 64). `size_range=(lo, hi)` bounds the longer side of every
    image instead of the LAION-like default; `formats` restricts the encodings. `consent_per_kind` > 0
    turns ok rows into the consent web's rows (CONSENT_KINDS, that many each): robots.txt and
    tdmrep.json on the main site and on extra sites, and blocklist.txt / optout.txt beside the
    metadata for the run to pass (SynthWeb.consent_flags). `dupes_per_kind` > 0 turns ok rows into
    planted duplicates of other ok rows (DUPE_KINDS, that many each, every one of its own original),
    written down in duplicates.json (SynthWeb.duplicates); they stay kind "ok" (kept without --dedup).
    Byte-identical
    output for the same arguments; base_url=None picks a free 127.0.0.1 port, which is in every URL.
    """
    if rows < 1:
        raise SynthArgumentError("rows must be >= 1")
    if not 0.0 <= failure_rate <= 1.0:
        raise SynthArgumentError("failure_rate must be within [0, 1]")
    formats = tuple(formats)
    if not formats or any(f not in FORMATS for f in formats):
        raise SynthArgumentError(f"formats must be a non-empty subset of {FORMATS}")
    if min_size < 8:
        raise SynthArgumentError("min_size must be >= 8")
    if size_range is not None and not 8 <= size_range[0] <= size_range[1]:
        raise SynthArgumentError(f"size_range {tuple(size_range)}: give LO HI with 8 <= LO <= HI")
    for name, rate in (("mismatch_rate", mismatch_rate), ("toxic_rate", toxic_rate)):
        if not 0.0 <= rate <= 1.0:
            raise SynthArgumentError(f"{name} must be within [0, 1]")
    rng = random.Random(seed)
    out = Path(out_dir)
    port = None
    if base_url is not None:
        base_url = base_url.rstrip("/")
        parts = urlsplit(base_url)
        # The server binds 127.0.0.1 only; any other host would send the pipeline off the machine.
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or parts.path:
            raise ValueError(f"base_url must be http://127.0.0.1:PORT (or localhost), got {base_url!r}")
        port = parts.port or 80
    if consent_per_kind < 0:
        raise SynthArgumentError("consent_per_kind must be >= 0")
    if dupes_per_kind < 0:
        raise SynthArgumentError("dupes_per_kind must be >= 0")
    main_port, aux_port, alt_port, v6_port, site_ports = _free_ports(port, len(CONSENT_SITES) if consent_per_kind else 0)
    sites = dict(zip(CONSENT_SITES, site_ports))
    if base_url is None:
        base_url, port = f"http://127.0.0.1:{main_port}", main_port

    n_fail = min(round(rows * failure_rate), rows - 1)
    kinds = [FAILURE_KINDS[i % len(FAILURE_KINDS)] for i in range(n_fail)] + ["ok"] * (rows - n_fail)
    rng.shuffle(kinds)  # failures spread over the file, not clustered
    if mismatch_rate or toxic_rate:
        if not (0.0 <= mismatch_rate and 0.0 <= toxic_rate and mismatch_rate + toxic_rate <= 1.0):
            raise ValueError("mismatch_rate and toxic_rate must be >= 0 and sum to <= 1")
        ok_idx = [i for i, k in enumerate(kinds) if k == "ok"]
        n_mis, n_tox = round(rows * mismatch_rate), round(rows * toxic_rate)
        if n_mis + n_tox > len(ok_idx) - 1:
            raise ValueError(f"not enough ok rows ({len(ok_idx)}) for {n_mis} mismatched + {n_tox} toxic captions")
        picked = rng.sample(ok_idx, n_mis + n_tox)
        for j, i in enumerate(picked):
            kinds[i] = "mismatched_caption" if j < n_mis else "toxic_caption"
    if consent_per_kind:
        ok_idx = [i for i, k in enumerate(kinds) if k == "ok"]
        n_consent = consent_per_kind * len(CONSENT_KINDS)
        if n_consent > len(ok_idx) - 1:
            raise SynthArgumentError(f"not enough ok rows ({len(ok_idx)}) for {n_consent} consent rows "
                                     f"({consent_per_kind} x {len(CONSENT_KINDS)} kinds): add rows")
        for j, i in enumerate(sorted(rng.sample(ok_idx, n_consent))):
            kinds[i] = list(CONSENT_KINDS)[j % len(CONSENT_KINDS)]
    sample_ids = rng.sample(range(10**9, 4 * 10**12), rows)

    planner = _Planner(rng, base_url, (aux_port, alt_port, v6_port), min_size, size_range, formats)
    metas: list[dict | None] = [None] * rows
    truths: list[dict | None] = [None] * rows
    for i, kind in enumerate(kinds):
        if kind in CONSENT_KINDS:
            metas[i], truths[i] = planner.consent_row(kind, sample_ids[i], sites)
        elif kind != "duplicate":
            metas[i], truths[i] = planner.row(kind, sample_ids[i])
    if consent_per_kind:
        planner.consent_files(sites)
    ok_rows = [i for i, k in enumerate(kinds) if k == "ok"]
    for i, kind in enumerate(kinds):
        if kind == "duplicate":
            orig = rng.choice(ok_rows)
            if sample_ids[i] < sample_ids[orig]:
                # The pipeline keeps the smallest SAMPLE_ID among duplicates: that must be the original.
                for rowset in (metas, truths):
                    rowset[orig]["SAMPLE_ID"] = sample_ids[i]
                sample_ids[i], sample_ids[orig] = sample_ids[orig], sample_ids[i]
            metas[i] = {**metas[orig], "SAMPLE_ID": sample_ids[i]}
            truths[i] = {**truths[orig], "SAMPLE_ID": sample_ids[i], "kind": "duplicate"}
            truths[i]["expected_stage"], truths[i]["expected_reason"] = EXPECTED["duplicate"]

    dupes = _plant_dupes(planner, kinds, metas, truths, dupes_per_kind) if dupes_per_kind else None

    images = out / "images"
    if images.exists():
        shutil.rmtree(images)  # stale files from an earlier synth would be served by the aux listeners
    images.mkdir(parents=True)
    _write_files(images, planner.files)

    pq.write_table(pa.Table.from_pylist(metas, schema=LAION_SCHEMA), out / "metadata.parquet")
    pq.write_table(pa.Table.from_pylist(truths, schema=GROUND_TRUTH_SCHEMA), out / "ground_truth.parquet")
    (out / "routes.json").write_text(json.dumps(planner.routes, indent=1, sort_keys=True))
    if dupes is not None:
        (out / DUPES_FILE).write_text(json.dumps(dupes, indent=1))
    elif (out / DUPES_FILE).exists():
        (out / DUPES_FILE).unlink()  # a stale ground truth from an earlier synth
    if consent_per_kind:
        lines = ["# name: synth-blocklist", "# the consent web's planted blocklist entries (pipeline.testbed.synth)"]
        (out / BLOCKLIST_FILE).write_text("\n".join(lines + [f"{k} {v}" for k, v in planner.blocklist]) + "\n")
        (out / OPTOUT_FILE).write_text(f"# the consent web's offline opt-out list\n{base_url}/listed/\n")
    counts = {k: kinds.count(k) for k in EXPECTED if k in kinds}
    web = {
        "base_url": base_url,
        "port": port,
        "aux_port": aux_port,
        "alt_loopback_port": alt_port,
        "ipv6_port": v6_port,
        "seed": seed,
        "rows": rows,
        "failure_rate": failure_rate,
        "mismatch_rate": mismatch_rate,
        "toxic_rate": toxic_rate,
        "min_size": min_size,
        "size_range": list(size_range) if size_range else None,
        "formats": list(formats),
        "kinds": counts,
        "sites": sites,
    }
    (out / "web.json").write_text(json.dumps(web, indent=1))
    return SynthWeb.load(out)


# --------------------------------------------------------------------------------------------
# Planted duplicates (dupes_per_kind) and an evaluation folder that overlaps the web

DUPES_FILE = "duplicates.json"
# how -> what the copy is. Which dedup rule catches each is the test's to assert (tests/pipeline/test_dedup.py).
DUPE_KINDS = {
    "exact_copy": "the same file under another URL and caption",
    "reencoded": "the same pixels re-encoded as JPEG at quality 40",
    "resized": "scaled to 75% of each side",
    "cropped": "the central 75% of each side",
    "colour_shifted": "red x1.12 + 10, blue x0.9",
    "rescene": "the same scene drawn again, every shape moved by 8% of the width, under another caption",
}
_DUPE_PREFIXES = ("Copy: ", "Stock photo, ", "Seen online: ", "Reposted: ", "Image of this: ", "Look: ")


@dataclass(frozen=True)
class _Derived:
    """A planted duplicate's file: the original picture, transformed and encoded."""

    base: _Picture
    how: str

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.base.width, self.base.height
        if self.how == "resized":
            return round(w * 0.75), round(h * 0.75)
        if self.how == "cropped":
            return round(w * 0.75), round(h * 0.75)
        return w, h

    @property
    def fmt(self) -> str:
        return "jpeg" if self.how == "reencoded" else self.base.fmt

    def picture(self) -> _Picture:
        if self.how != "rescene":
            return self.base
        b = self.base
        dx = round(0.08 * b.width)
        shapes = []
        for sh in b.shapes:
            x0, y0, x1, y1 = sh["bbox"]
            shift = dx if x1 + dx <= b.width else -min(dx, x0)
            shapes.append({**sh, "bbox": [x0 + shift, y0, x1 + shift, y1]})
        return _Picture(b.width, b.height, b.background, tuple(shapes), b.fmt, b.quality, texture=(b.texture or 0) ^ 0x5EED)

    def encode(self) -> bytes:
        if self.how == "exact_copy":
            return self.base.encode()
        img = self.picture().render()
        w, h = img.size
        if self.how == "resized":
            img = img.resize(self.size, Image.LANCZOS)
        elif self.how == "cropped":
            cw, ch = self.size
            img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
        elif self.how == "colour_shifted":
            a = np.asarray(img).astype(np.float32)
            a[..., 0] = a[..., 0] * 1.12 + 10
            a[..., 2] = a[..., 2] * 0.9
            img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        if self.how == "reencoded":
            img.save(buf, "JPEG", quality=40)
        else:
            if self.base.fmt == "jpeg":
                img.save(buf, "JPEG", quality=self.base.quality)
            elif self.base.fmt == "png":
                img.save(buf, "PNG")
            else:
                img.save(buf, "WEBP", quality=self.base.quality, method=2)
        return buf.getvalue()


def _plant_dupes(planner: _Planner, kinds: list, metas: list, truths: list, per_kind: int) -> list[dict]:
    """Turn 2 x per_kind x len(DUPE_KINDS) ok rows into (original, duplicate) pairs; returns the ground truth."""
    rng = planner.rng
    uid_count: dict = {}
    for t in truths:
        uid_count[t["uid"]] = uid_count.get(t["uid"], 0) + 1
    ok = [i for i, k in enumerate(kinds) if k == "ok" and uid_count[truths[i]["uid"]] == 1
          and isinstance(planner.files.get(truths[i]["image_file"]), _Picture)]
    need = 2 * per_kind * len(DUPE_KINDS)
    if need > len(ok) - 1:
        raise SynthArgumentError(f"not enough ok rows ({len(ok)}) for {need // 2} planted duplicates and their originals: add rows")
    picked = sorted(rng.sample(ok, need))
    rng.shuffle(picked)
    out = []
    for j, how in enumerate(h for h in DUPE_KINDS for _ in range(per_kind)):
        orig, dup = picked[2 * j], picked[2 * j + 1]
        base = dataclasses.replace(planner.files[truths[orig]["image_file"]], texture=rng.getrandbits(32))
        planner.files[truths[orig]["image_file"]] = base
        derived = _Derived(base, how)
        fmt = derived.fmt
        name = f"{planner.token()}.{EXTENSIONS[fmt]}"
        planner.files[name] = derived
        planner._route("ok", f"/{name}", name, fmt)
        url = f"{planner.base_url}/{name}"
        text = rng.choice(_DUPE_PREFIXES) + metas[orig]["TEXT"]
        w, h = derived.size
        metas[dup] = {**metas[dup], "URL": url, "TEXT": text, "WIDTH": w, "HEIGHT": h}
        shapes = [dict(s) for s in derived.picture().shapes]
        truths[dup] = {**truths[dup], "uid": compute_uid(url, text), "URL": url, "TEXT": text, "background": base.background,
                       "shapes": json.dumps(shapes), "true_width": w, "true_height": h, "format": fmt, "image_file": name}
        out.append({"uid": truths[dup]["uid"], "SAMPLE_ID": truths[dup]["SAMPLE_ID"], "of_uid": truths[orig]["uid"],
                    "of_SAMPLE_ID": truths[orig]["SAMPLE_ID"], "how": how})
    return sorted(out, key=lambda d: d["uid"])


def write_eval_folder(web: SynthWeb, out_dir: str | Path, overlap: int, others: int = 4, seed: int = 0) -> dict:
    """An evaluation set for decontamination tests: `overlap` images of the web (ok rows that are
    no planted duplicate's original or copy), re-encoded as PNG, plus `others` scenes that are not
    in the web. Returns {eval image name: the overlapped row's uid, or None}; also written to
    overlap.json in the folder (not an image: the folder's readers skip it)."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truths = pq.read_table(web.ground_truth_path).to_pylist()
    involved = {d["uid"] for d in web.duplicates} | {d["of_uid"] for d in web.duplicates}
    uid_count: dict = {}
    for t in truths:
        uid_count[t["uid"]] = uid_count.get(t["uid"], 0) + 1
    from pipeline.blocklist import pdq_of

    def pdq_quality(t):
        return pdq_of(np.asarray(Image.open(web.images_dir / t["image_file"]).convert("RGB")), bgr=False)[1]

    # Rows whose image is detailed enough for PDQ (quality >= 60; the pipeline skips < 50).
    ok = [t for t in truths if t["kind"] == "ok" and t["uid"] not in involved and uid_count[t["uid"]] == 1 and t["image_file"]]
    ok = [t for t in ok if pdq_quality(t) >= 60]
    if overlap > len(ok):
        raise SynthArgumentError(f"only {len(ok)} plain ok rows to overlap, asked for {overlap}")
    truth = {}
    for i, t in enumerate(rng.sample(ok, overlap)):
        img = Image.open(web.images_dir / t["image_file"]).convert("RGB")
        name = f"eval_{i:04d}.png"
        img.save(out / name, "PNG")
        truth[name] = t["uid"]
    for i in range(others):
        w, h = rng.randint(200, 400), rng.randint(200, 400)
        bg, fg = rng.sample(list(COLOURS), 2)
        s = rng.randint(60, 150)
        x0, y0 = rng.randint(0, w - s), rng.randint(0, h - s)
        shape = {"shape": rng.choice(SHAPES), "colour": fg, "position": "center", "bbox": [x0, y0, x0 + s, y0 + s]}
        name = f"other_{i:04d}.png"
        _Picture(w, h, bg, (shape,), "png", 0).render().save(out / name, "PNG")
        truth[name] = None
    (out / "overlap.json").write_text(json.dumps(truth, indent=1, sort_keys=True))
    return truth


def _write_files(images: Path, files: dict) -> None:
    """Encode and write every file; in threads, since Pillow's encoders release the GIL."""
    # ~0.1 s to build, shared by every bomb of this synth.
    bomb_idat = _bomb_idat(BOMB_SIDE) if any(isinstance(s, tuple) and s[0] == "bomb" for s in files.values()) else b""

    def write(item):
        name, spec = item
        if isinstance(spec, (_Picture, _Derived)):
            data = spec.encode()
        elif isinstance(spec, bytes):
            data = spec
        elif spec[0] == "truncate":
            data = spec[1].encode()
            data = data[: len(data) // 2]
        else:
            data = _bomb_png(bomb_idat, BOMB_SIDE, spec[1])
        (images / name).write_bytes(data)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, sorted(files.items())))


# --------------------------------------------------------------------------------------------
# CLI


def add_synth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, required=True, help="metadata rows to write")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--failure-rate", type=float, default=0.3, help="share of rows with a planted failure")
    parser.add_argument("--base-url", default=None, help="http://127.0.0.1:PORT to put in URLs (default: a free port now)")
    parser.add_argument("--min-size", type=int, default=64, help="the pipeline's --min-image-size the planted small images undercut")
    parser.add_argument("--size-range", type=int, nargs=2, metavar=("LO", "HI"), default=None, help="longer side of every image, px")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of jpeg,png,webp")
    parser.add_argument("--mismatch-rate", type=float, default=0.0, help="share of rows whose caption describes another scene")
    parser.add_argument("--toxic-rate", type=float, default=0.0, help="share of rows whose caption carries a toxic phrase")
    parser.add_argument("--dupes-per-kind", type=int, default=0,
                        help="planted duplicates of each kind (exact copy, re-encoded, resized, cropped, colour-shifted, "
                             "re-rendered scene), listed in duplicates.json")


def main_synth(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    web = synthesize(
        args.out,
        args.rows,
        seed=args.seed,
        failure_rate=args.failure_rate,
        base_url=args.base_url,
        min_size=args.min_size,
        size_range=tuple(args.size_range) if args.size_range else None,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        mismatch_rate=args.mismatch_rate,
        toxic_rate=args.toxic_rate,
        dupes_per_kind=args.dupes_per_kind,
    )
    print(f"wrote {web.rows} rows to {web.root} in {time.monotonic() - t0:.1f}s; base URL {web.base_url}")
    print("kinds: " + ", ".join(f"{k}={n}" for k, n in web.kinds.items()))
    print(f"serve with: kiln serve {web.root}")
    return 0
