"""pipeline.card.hub: licence ids, size categories and the offline checks of the Hub's metadata rules."""

import collections

import pytest

from pipeline.card.facts import Facts
from pipeline.card.hub import SIZE_CATEGORIES, card_metadata, hf_license_id, hub_licence, licence_metadata, size_category, validate_card_metadata


@pytest.mark.parametrize("n, category", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (99_999, "10K<n<100K"),
                                         (413_000_000, "100M<n<1B"), (10**12, "n>1T")])
def test_size_category(n, category):
    assert size_category(n) == category


@pytest.mark.parametrize("value, licence", [
    ("https://creativecommons.org/licenses/by-sa/4.0/", "cc-by-sa-4.0"),
    ("http://www.creativecommons.org/licenses/by-nc-nd/3.0/deed.en", "cc-by-nc-nd-3.0"),
    ("creativecommons.org/publicdomain/zero/1.0/", "cc0-1.0"),
    ("https://creativecommons.org/publicdomain/mark/1.0/", None),  # a mark, not a licence
    ("https://creativecommons.org/licenses/by/9.9/", None),
    ("MIT", "mit"), ("unknown", None), ("?", None), (None, None),
])
def test_hf_license_id(value, licence):
    assert hf_license_id(value) == licence


def test_hub_licence_says_unknown_for_values_that_say_nothing():
    assert [hub_licence(v) for v in ("?", " Unknown ", "", "(null)", "cc-by-4.0", "All rights reserved")] == [
        "unknown", "unknown", "unknown", "unknown", "cc-by-4.0", "other"]


def _facts(licences: dict, kept: int, languages=None, modes=None) -> Facts:
    facts = Facts("d", {"stage_modes": modes or {}}, {}, kept=kept)
    facts.licences = collections.Counter(licences)
    facts.has_license_column = bool(licences)
    facts.languages = collections.Counter(languages or {})
    return facts


def test_licence_metadata_one_licence_a_mix_and_none():
    assert licence_metadata(_facts({"https://creativecommons.org/licenses/by/4.0/": 3}, 3)) == (
        {"license": "cc-by-4.0"}, "Every kept sample's LICENSE value maps to `cc-by-4.0`.")
    fields, sentence = licence_metadata(_facts({"?": 1, "https://creativecommons.org/licenses/by/4.0/": 3}, 4))
    assert fields["license"] == "other" and fields["license_name"] == "kiln-per-sample-mix" and fields["license_link"] == "README.md"
    assert "cc-by-4.0 75.00%, unknown 25.00% of 4 samples" in fields["license_details"]
    assert sentence.startswith("The samples carry different licences (mix: cc-by-4.0 75.00%, unknown 25.00%)")
    assert licence_metadata(_facts({}, 4))[0] == {"license": "unknown"}


def test_card_metadata_passes_the_hub_rules_and_the_rules_reject_what_the_hub_rejects():
    meta = card_metadata(_facts({"?": 2}, 2000, languages={"de": 1500, "en": 499, "xx-": 1}, modes={"clip": "filter", "t5": "embed"}), None, "Shapes")
    assert meta["language"] == ["de", "en"] and meta["multilinguality"] == "multilingual"
    assert meta["size_categories"] == ["1K<n<10K"] and meta["license"] == "unknown"
    assert meta["tags"] == ["kiln", "webdataset", "image-text-pairs", "laion-format", "clip-filtered", "t5-embeddings"]
    assert validate_card_metadata(meta) == []
    assert card_metadata(_facts({}, 5), ["fr"], "x")["language"] == ["fr"]
    assert card_metadata(_facts({}, 5), None, "x")["language"] == ["en"]
    assert validate_card_metadata({**meta, "size_categories": ["lots"]}) == [f"size_categories 'lots' is not one of {SIZE_CATEGORIES}"]
    assert validate_card_metadata({**meta, "license": "other", "license_name": "Mixed Licences"}) == ["license: other needs a license_name like 'my-license-1.0'"]
    assert validate_card_metadata({**meta, "license": "cc-by-sa"}) == ["license 'cc-by-sa' is not a Hub licence id"]
    assert validate_card_metadata({**meta, "language": ["English"], "task_categories": ["painting"], "pretty_name": " ",
                                   "annotations_creators": ["robots"], "tags": [""], "configs": [{"config_name": "x"}]}) == [
        "language 'English' is not an ISO 639-1/2/3 code", "task_categories 'painting' is not a Hub task",
        "annotations_creators 'robots' is not one of ['crowdsourced', 'expert-generated', 'found', 'machine-generated', 'no-annotation', 'other']",
        "pretty_name must be a non-empty string", "tags must be non-empty strings",
        "configs entry {'config_name': 'x'} needs config_name and data_files"]
