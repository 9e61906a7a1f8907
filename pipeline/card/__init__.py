"""`kiln card DATASET_DIR`: the dataset card (README.md) of a finished `kiln prepare` output.

The card is a Hugging Face dataset card -- a YAML metadata block (`huggingface_hub.DatasetCard`
loads it) followed by the sections of Datasheets for Datasets (Gebru et al., 2021): Motivation,
Composition, Collection process, Preprocessing and filtering, Uses, Distribution, Maintenance --
filled from the run, not from a template:

- the funnel (input rows -> kept, per stage and per reject reason) is recounted from the files a
  reader would read -- every rejects parquet grouped by stage and reason, every meta parquet's rows,
  manifest.json, the tars -- and cross-checked against stats.json by pipeline.accounting, the check
  the finalizer uses; any disagreement raises CardError and no card is written;
- every flag, threshold and stage mode, every model with its source and weight sha256, kiln's
  version and commit, the Beam runner and options, the run's start and end, the exact command;
- each opt-out protocol (robots.txt, TDMRep, X-Robots-Tag, opt-out lists, C2PA) and blocklist with the
  rows it removed (stats.json's consent record, pipeline.consent), the LICENSE column's mix
  and the top source domains of the kept rows;
- plots beside the card (card_plots/*.png): score distributions with their thresholds, image
  sizes, caption and T5 lengths, and a grid of seeded pseudo-random kept samples;
- known limitations and biases of the filters used, and the questions the card cannot answer.

Beside the card, from the same facts: croissant.json (Croissant 1.0 JSON-LD with the RAI fields:
the files, every meta and rejects column, how the data was collected; pipeline.card.croissant) and
training_summary.md / training_summary.json (a draft of the EU AI Act's public summary of training
content, the Commission's July 2025 template; pipeline.card.summary).

stats.json stays the machine-readable twin of the card. The output is deterministic for the same
dataset (the only timestamps are the run's own, copied from stats.json).

  facts.py    reading the dataset: the recount, the histograms, the sample grid's picks
  plots.py    the PNGs (matplotlib)
  hub.py      the Hub metadata: licence ids, size categories, the offline validation
  render.py   the Markdown, one function per section
  croissant.py  croissant.json
  summary.py  training_summary.json and .md
  __init__    this API: build_card, build_documents, write_card, CardError, and the `kiln card` command

`kiln --help` builds this package's parser (add_card_args), so numpy, pyarrow, Beam and matplotlib
are imported on first use (the submodules, imported inside the functions below), not here.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from pipeline.errors import CardError  # noqa: F401  (defined there: pipeline.card.facts raises it too)


def build_card(dataset_dir: str, *, seed: int = 0, n_samples: int = 16, language: list[str] | None = None,
               pretty_name: str | None = None, verify_tars: bool | None = None,
               unscreened_samples: bool = False) -> tuple[str, dict[str, bytes], dict]:
    """(README.md text, {relative plot path: png bytes}, metadata) for a dataset; writes nothing."""
    text, pngs, meta, _, _ = _build(dataset_dir, seed=seed, n_samples=n_samples, language=language, pretty_name=pretty_name,
                                    verify_tars=verify_tars, unscreened_samples=unscreened_samples)
    return text, pngs, meta


def build_documents(facts, pretty_name: str, language: list[str] | None = None) -> dict[str, bytes]:
    """{file name: bytes} of croissant.json, training_summary.json and training_summary.md, from the
    card's facts (pipeline.card.facts.collect); writes nothing. Each carries kiln's marker
    (pipeline.outdir), so kiln knows it as its own file."""
    import json

    from pipeline.card.croissant import build_croissant
    from pipeline.card.summary import build_summary, render_summary
    from pipeline.outdir import CROISSANT_NAME, JSON_MARKER, JSON_MARKER_KEY, SUMMARY_JSON_NAME, SUMMARY_MARKER, SUMMARY_MD_NAME

    marker = (JSON_MARKER_KEY, JSON_MARKER)
    with _unexpected_content(facts.dataset_dir):
        croissant = build_croissant(facts, pretty_name, language, marker=marker)
        summary = build_summary(facts, language, marker=marker)
        summary_md = render_summary(summary, marker_line=SUMMARY_MARKER)

    def dump(obj) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")

    return {CROISSANT_NAME: dump(croissant), SUMMARY_JSON_NAME: dump(summary), SUMMARY_MD_NAME: summary_md.encode("utf-8")}


def _build(dataset_dir: str, *, seed: int, n_samples: int, language: list[str] | None, pretty_name: str | None,
           verify_tars: bool | None, unscreened_samples: bool):
    """build_card's (text, pngs, metadata), plus the facts and the pretty name the documents reuse."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from pipeline.accounting import AccountingError
    from pipeline.card import hub, plots, render
    from pipeline.card.facts import collect
    from pipeline.outdir import CARD_MARKER

    dataset_dir = str(dataset_dir).rstrip("/")
    try:
        facts = collect(dataset_dir, seed=seed, n_samples=n_samples, verify_tars=verify_tars, unscreened_samples=unscreened_samples)
    except FileNotFoundError as err:
        raise CardError(str(err)) from err
    except AccountingError as err:
        raise CardError(f"{dataset_dir}: the dataset's files disagree with its stats/manifest; no card written:\n  "
                        + "\n  ".join(err.problems)) from err
    name = pretty_name or f"{dataset_dir.rsplit('/', 1)[-1]} (kiln image-text pairs)"
    pngs, refs = {}, {}
    with _unexpected_content(dataset_dir):
        for key, (png, why) in plots.draw(facts).items():
            if png is None:
                refs[key] = why
            else:
                rel = f"{plots.PLOTS_DIR}/{key}.png"
                pngs[rel], refs[key] = png, rel
        meta = hub.card_metadata(facts, language, name)
    problems = hub.validate_card_metadata(meta)
    if problems:
        raise CardError("card metadata fails the Hub's rules: " + "; ".join(problems))
    data = DatasetCardData(**meta)
    if data.to_dict() != meta:
        raise CardError(f"card metadata does not round-trip through DatasetCardData: {data.to_dict()} != {meta}")
    with _unexpected_content(dataset_dir):
        body = render.render(facts, refs, name, seed, language)
    # The marker line (an HTML comment after the YAML block: invisible on the Hub, metadata untouched)
    # is how kiln knows this README.md as its own card, the only README.md it ever replaces.
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{CARD_MARKER}\n\n{body}")
    if card.data.to_dict() != meta:
        raise CardError("card metadata does not survive DatasetCard's parser")
    if CARD_MARKER not in str(card):
        raise CardError("the card's marker line does not survive DatasetCard")
    return str(card), pngs, meta, facts, name


@contextlib.contextmanager
def _unexpected_content(dataset_dir: str):
    """stats.json values of the wrong kind that facts.check_shape does not look at (a flag that is
    not a number, ...) break the card's formatting: one line naming stats.json, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise CardError(f"{dataset_dir}/stats.json: unexpected content ({type(err).__name__}: {err}); is it the file "
                        f"`kiln prepare` wrote? Re-run kiln prepare to rewrite it (`kiln --debug card` shows where)") from err


def write_card(dataset_dir, *, seed: int = 0, n_samples: int = 16, language: list[str] | None = None,
               pretty_name: str | None = None, verify_tars: bool | None = None, unscreened_samples: bool = False):
    """Cross-check the dataset, then write DATASET_DIR/README.md, DATASET_DIR/card_plots/*.png, and
    beside the card croissant.json, training_summary.json and training_summary.md.

    Returns the card's path (a Path for a local directory, the URL string otherwise). Raises
    CardError, writing nothing, if the files disagree with stats.json or manifest.json, or if one of
    README.md, croissant.json, training_summary.json, training_summary.md is there and kiln did not
    write it (it lacks kiln's marker: pipeline.outdir.is_kiln_document): kiln never replaces a file of
    the user's. In card_plots/ only the plots the card names (pipeline.outdir.PLOT_NAMES) are written
    or removed; every other file there stays. Each file appears atomically (temp name + rename),
    README.md last.
    """
    from pipeline.outdir import CARD_NAME, MARKED_NAMES, PLOTS_DIR, atomic_write, delete_files, is_kiln_name, join, list_files

    base = str(dataset_dir).rstrip("/")
    out = join(base, CARD_NAME)
    _check_not_users_files(base)
    text, pngs, meta, facts, name = _build(base, seed=seed, n_samples=n_samples, language=language, pretty_name=pretty_name,
                                           verify_tars=verify_tars, unscreened_samples=unscreened_samples)
    # The captions' languages only when someone declared them (--language, a LANGUAGE column), not the card's default.
    documents = build_documents(facts, name, meta.get("language") if language or facts.languages else None)
    _check_not_users_files(base)  # again: the recount can take a while
    fresh = {p.rsplit("/", 1)[-1] for p in pngs}
    stale = [m.path for m in list_files(join(base, PLOTS_DIR))
             if is_kiln_name(f"{PLOTS_DIR}/{m.path.rsplit('/', 1)[-1]}") and m.path.rsplit("/", 1)[-1] not in fresh]
    for rel, png in sorted(pngs.items()):
        atomic_write(join(base, rel), lambda f, data=png: f.write(data))
    delete_files(stale)
    for doc in MARKED_NAMES:  # README.md is the last of them
        data = text.encode("utf-8") if doc == CARD_NAME else documents[doc]
        atomic_write(join(base, doc), lambda f, data=data: f.write(data))
    return out if "://" in base else Path(out)


def _check_not_users_files(base: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    from pipeline.outdir import CARD_NAME, MARKED_NAMES, is_kiln_document, join

    for name in MARKED_NAMES:
        path = join(base, name)
        if FileSystems.exists(path) and not is_kiln_document(path, name):
            if name == CARD_NAME:
                raise CardError(f"{path} is not a dataset card kiln wrote (it lacks kiln's marker line), so kiln will not "
                                f"replace it: move it away and re-run")
            raise CardError(f"{path} is not a file kiln wrote (it lacks kiln's marker), so kiln will not replace it: "
                            f"move it away and re-run")


# -- `kiln card` -----------------------------------------------------------------------------------


def add_card_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset_dir", help="a finished `kiln prepare` output (local or gs://, s3://)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample grid's pick [0]")
    p.add_argument("--samples", type=int, default=16, help="samples in the grid [16]")
    p.add_argument("--language", default=None, help="comma-separated ISO 639 codes of the captions [from a LANGUAGE column, else en]")
    p.add_argument("--pretty-name", default=None, help="the dataset's display name [DIR (kiln image-text pairs)]")
    p.add_argument("--no-verify-tars", dest="verify_tars", action="store_const", const=False, default=None,
                   help="check tar sizes only, not their member lists (default: list members for local datasets)")
    p.add_argument("--unscreened-samples", action="store_true",
                   help="draw the sample grid even when no NSFW scores exist (--nsfw off); off by default because the card is public")


def main_card(args: argparse.Namespace) -> int:
    """`kiln card`. CardError (the files disagree, stats.json or manifest.json is not kiln's, a
    README.md of the user's is in the way) propagates: pipeline.cli prints it as one line, exit 1."""
    if args.samples < 0:
        from pipeline.errors import UserError

        raise UserError(f"--samples {args.samples}: the grid's sample count must be >= 0 (0: no grid)")
    language = [x.strip() for x in args.language.split(",") if x.strip()] if args.language else None
    path = write_card(args.dataset_dir, seed=args.seed, n_samples=args.samples, language=language,
                      pretty_name=args.pretty_name, verify_tars=args.verify_tars,
                      unscreened_samples=args.unscreened_samples)
    from pipeline.card.plots import PLOTS_DIR

    print(f"kiln card: wrote {path} and its plots in {PLOTS_DIR}/, croissant.json, training_summary.md and training_summary.json")
    return 0
