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
- opt-outs honoured (X-Robots-Tag directives and the rows each removed), the LICENSE column's mix
  and the top source domains of the kept rows;
- plots beside the card (card_plots/*.png): score distributions with their thresholds, image
  sizes, caption and T5 lengths, and a grid of seeded pseudo-random kept samples;
- known limitations and biases of the filters used, and the questions the card cannot answer.

stats.json stays the machine-readable twin of the card. The output is deterministic for the same
dataset (the only timestamps are the run's own, copied from stats.json).

  facts.py    reading the dataset: the recount, the histograms, the sample grid's picks
  plots.py    the PNGs (matplotlib)
  hub.py      the Hub metadata: licence ids, size categories, the offline validation
  render.py   the Markdown, one function per section
  __init__    this API: build_card, write_card, CardError, and the `kiln card` command

`kiln --help` builds this package's parser (add_card_args), so numpy, pyarrow, Beam and matplotlib
are imported on first use (the submodules, imported inside the functions below), not here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import RunFailed


class CardError(RunFailed):
    """The dataset's files disagree with stats.json or manifest.json (or the card's metadata breaks
    the Hub's rules): no card is written."""


def build_card(dataset_dir: str, *, seed: int = 0, n_samples: int = 16, language: list[str] | None = None,
               pretty_name: str | None = None, verify_tars: bool | None = None,
               unscreened_samples: bool = False) -> tuple[str, dict[str, bytes], dict]:
    """(README.md text, {relative plot path: png bytes}, metadata) for a dataset; writes nothing."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from pipeline.accounting import AccountingError
    from pipeline.card import hub, plots, render
    from pipeline.card.facts import collect

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
    body = render.render(facts, refs, name, seed, language)
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    if card.data.to_dict() != meta:
        raise CardError("card metadata does not survive DatasetCard's parser")
    return str(card), pngs, meta


def write_card(dataset_dir, *, seed: int = 0, n_samples: int = 16, language: list[str] | None = None,
               pretty_name: str | None = None, verify_tars: bool | None = None, unscreened_samples: bool = False):
    """Cross-check the dataset, then write DATASET_DIR/README.md and DATASET_DIR/card_plots/*.png.

    Returns the card's path (a Path for a local directory, the URL string otherwise). Raises
    CardError, writing nothing, if the files disagree with stats.json or manifest.json.
    """
    from apache_beam.io.filesystems import FileSystems

    from pipeline.card.hub import CARD_NAME
    from pipeline.card.plots import PLOTS_DIR
    from pipeline.finalize import match
    from pipeline.write import _atomic_write

    base = str(dataset_dir).rstrip("/")
    text, pngs, _ = build_card(base, seed=seed, n_samples=n_samples, language=language, pretty_name=pretty_name,
                               verify_tars=verify_tars, unscreened_samples=unscreened_samples)
    names = {p.rsplit("/", 1)[-1] for p in pngs}
    stale = [m.path for m in match(f"{base}/{PLOTS_DIR}/*.png") if m.path.rsplit("/", 1)[-1] not in names]
    if stale:
        FileSystems.delete(stale)
    for rel, png in sorted(pngs.items()):
        _atomic_write(f"{base}/{rel}", lambda f, data=png: f.write(data))
    out = f"{base}/{CARD_NAME}"
    data = text.encode("utf-8")
    _atomic_write(out, lambda f: f.write(data))
    return out if "://" in base else Path(out)


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
    language = [x.strip() for x in args.language.split(",") if x.strip()] if args.language else None
    try:
        path = write_card(args.dataset_dir, seed=args.seed, n_samples=args.samples, language=language,
                          pretty_name=args.pretty_name, verify_tars=args.verify_tars,
                          unscreened_samples=args.unscreened_samples)
    except CardError as err:
        print(f"kiln card: FAILED: {err}", file=sys.stderr)
        return 1
    from pipeline.card.plots import PLOTS_DIR

    print(f"kiln card: wrote {path} and its plots in {PLOTS_DIR}/")
    return 0
