"""The card's Hugging Face Hub metadata: the YAML block's fields, and the Hub's rules for them.

`huggingface_hub.DatasetCard.validate()` posts the card to the Hub's API; `validate_card_metadata`
checks the same rules for the fields kiln writes without touching the network.
"""

from __future__ import annotations

import collections
import re
from typing import TYPE_CHECKING

from pipeline.card.facts import pct
from pipeline.outdir import CARD_NAME  # the card's file in the dataset directory (the Hub's dataset card)

if TYPE_CHECKING:
    from pipeline.card.facts import Facts


# Hugging Face Hub metadata vocabularies (https://huggingface.co/docs/hub/datasets-cards and
# https://hf.co/docs/hub/repositories-licenses), for the fields this card writes.
SIZE_CATEGORIES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                   "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T")
HF_LICENSES = frozenset({
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
    "etalab-2.0", "eupl-1.1", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0",
    "isc", "lppl-1.3c", "ms-pl", "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1",
    "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr", "unknown", "other",
})
TASK_CATEGORIES = frozenset({
    "text-to-image", "image-to-text", "image-classification", "zero-shot-image-classification",
    "image-feature-extraction", "feature-extraction", "text-classification", "unconditional-image-generation",
    "image-to-image", "visual-question-answering", "text-generation", "other",
})
CREATORS = frozenset({"found", "crowdsourced", "expert-generated", "machine-generated", "no-annotation", "other"})
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
LICENSE_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
UNKNOWN_LICENSE_VALUES = ("", "?", "unknown", "none", "null")


def size_category(n: int) -> str:
    bounds = (10**3, 10**4, 10**5, 10**6, 10**7, 10**8, 10**9, 10**10, 10**11, 10**12)
    for bound, cat in zip(bounds, SIZE_CATEGORIES):
        if n < bound:
            return cat
    return SIZE_CATEGORIES[-1]


def hf_license_id(value) -> str | None:
    """A LICENSE column value (LAION: a Creative Commons URL or '?') -> a Hub licence id, or None."""
    v = (value or "").strip().lower()
    m = re.match(r"^(?:https?://)?(?:www\.)?creativecommons\.org/(licenses|publicdomain)/([a-z-]+)/(\d\.\d)", v)
    if not m:
        return v if v in HF_LICENSES and v not in ("unknown", "other") else None
    family, kind, version = m.groups()
    if family == "publicdomain":
        return "cc0-1.0" if kind == "zero" and version == "1.0" else None
    candidate = f"cc-{kind}-{version}"
    return candidate if candidate in HF_LICENSES else None


def hub_licence(value) -> str:
    """The Hub id the card gives a LICENSE value ("(null)": the column was null): a Hub licence
    id, "unknown" for values that say nothing, else "other"."""
    v = str(value).strip().lower()
    if v in UNKNOWN_LICENSE_VALUES or value == "(null)":
        return "unknown"
    return hf_license_id(value) or "other"


def licence_metadata(facts: Facts) -> tuple[dict, str]:
    """(YAML licence fields, a sentence for the card)."""
    if not facts.has_license_column or not facts.kept:
        return {"license": "unknown"}, "The input has no LICENSE column: the licence of the images and captions is unknown."
    ids = collections.Counter()
    for value, n in facts.licences.items():
        ids[hub_licence(value)] += n
    if len(ids) == 1:
        only = next(iter(ids))
        return {"license": only}, f"Every kept sample's LICENSE value maps to `{only}`."
    mix = ", ".join(f"{k} {pct(n, facts.kept)}" for k, n in sorted(ids.items(), key=lambda kv: (-kv[1], kv[0])))
    details = (f"Per-sample licences from the source metadata's LICENSE column, as declared by the source and not "
               f"verified: {mix} of {facts.kept} samples. See the card's licence table.")
    return ({"license": "other", "license_name": "kiln-per-sample-mix", "license_link": CARD_NAME, "license_details": details},
            f"The samples carry different licences (mix: {mix}), so the dataset is marked `other`; each sample's own LICENSE value is in its metadata.")


def card_metadata(facts: Facts, language: list[str] | None, pretty_name: str) -> dict:
    lic, _ = licence_metadata(facts)
    modes = facts.stats.get("stage_modes", {})
    langs = language
    if not langs:
        found = [code for code, n in facts.languages.most_common() if LANGUAGE_CODE.match(str(code)) and n >= 0.01 * max(1, facts.kept)]
        langs = sorted(found) or ["en"]
    tags = ["kiln", "webdataset", "image-text-pairs", "laion-format"]
    if modes.get("clip") == "filter":
        tags.append("clip-filtered")
    if modes.get("t5") == "embed":
        tags.append("t5-embeddings")
    return {
        **lic,
        "language": langs,
        "multilinguality": "monolingual" if len(langs) == 1 else "multilingual",
        "language_creators": ["found"],
        "annotations_creators": ["machine-generated"],
        "task_categories": ["text-to-image"],
        "size_categories": [size_category(facts.kept)],
        "pretty_name": pretty_name,
        "tags": tags,
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}],
    }


def validate_card_metadata(meta: dict) -> list[str]:
    """Offline checks of the Hub's dataset-card metadata rules for the fields kiln writes.
    (`DatasetCard.validate()` posts the card to the Hub's API; this never touches the network.)"""
    problems = []
    lic = meta.get("license")
    for v in lic if isinstance(lic, list) else [lic]:
        if v not in HF_LICENSES:
            problems.append(f"license {v!r} is not a Hub licence id")
    if lic == "other" and not LICENSE_NAME.match(str(meta.get("license_name", ""))):
        problems.append("license: other needs a license_name like 'my-license-1.0'")
    for code in meta.get("language", []):
        if not LANGUAGE_CODE.match(str(code)):
            problems.append(f"language {code!r} is not an ISO 639-1/2/3 code")
    for cat in meta.get("size_categories", []):
        if cat not in SIZE_CATEGORIES:
            problems.append(f"size_categories {cat!r} is not one of {SIZE_CATEGORIES}")
    for cat in meta.get("task_categories", []):
        if cat not in TASK_CATEGORIES:
            problems.append(f"task_categories {cat!r} is not a Hub task")
    for key in ("annotations_creators", "language_creators"):
        for v in meta.get(key, []):
            if v not in CREATORS:
                problems.append(f"{key} {v!r} is not one of {sorted(CREATORS)}")
    if not isinstance(meta.get("pretty_name"), str) or not meta["pretty_name"].strip():
        problems.append("pretty_name must be a non-empty string")
    if not all(isinstance(t, str) and t for t in meta.get("tags", [])):
        problems.append("tags must be non-empty strings")
    for cfg in meta.get("configs", []):
        if "config_name" not in cfg or not cfg.get("data_files"):
            problems.append(f"configs entry {cfg} needs config_name and data_files")
    return problems
