"""The card's plots (card_plots/*.png, matplotlib's Agg backend): score distributions with their
thresholds, image sizes, caption and T5 lengths, and a grid of seeded pseudo-random kept samples.

A plot that has no data is skipped with a reason the card prints in its place. PNGs carry no
Software/date metadata, so the same dataset gives the same bytes.
"""

from __future__ import annotations

import collections
import io
import tarfile
import textwrap
import warnings

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.card.facts import SCORES, Facts, FloatHist, IntHist, join, wh_edges
from pipeline.outdir import PLOT_NAMES, PLOTS_DIR  # noqa: F401 - card_plots/<name>.png beside README.md: the only plots kiln writes or deletes

IMAGE_EXTS = ("jpg", "png", "webp")
SERIES_STYLE = {
    "kept": ("kept", "tab:green"),
    "rejected_here": ("rejected by this filter", "tab:red"),
    "rejected_elsewhere": ("rejected at another stage", "tab:gray"),
}


def draw(facts: Facts) -> dict[str, tuple[bytes | None, str | None]]:
    """name -> (png bytes, None) or (None, why it was skipped)."""
    flags, modes = facts.stats.get("flags", {}), facts.stats.get("stage_modes", {})
    out = {}
    for score in SCORES:
        col = score.column
        if modes.get(score.stage, "off") == "off" or not facts.score_non_null[col]:
            out[col] = (None, f"the {score.label} stage was off in this run, so the `{col}` column is null")
            continue
        thr = flags.get(score.threshold_flag)
        thr_label = f"--{score.threshold_flag.replace('_', '-')} {thr}" + ("" if modes.get(score.stage) == "filter" else " (score mode: not applied)")
        out[col] = (plot_score(facts.scores[col], f"{col}: kept and rejected rows", col, thr, thr_label), None)
    if facts.shorter_side.n:
        out["image_sizes"] = (plot_image_sizes(facts, flags.get("image_size")), None)
    else:
        out["image_sizes"] = (None, "no kept samples")
    if facts.caption_chars.n:
        marks = [(flags.get("min_caption_chars"), "--min-caption-chars"), (flags.get("max_caption_chars"), "--max-caption-chars")]
        out["caption_chars"] = (plot_int_hist(facts.caption_chars, "Caption length (kept)", "characters", [(x, lab) for x, lab in marks if x is not None]), None)
    else:
        out["caption_chars"] = (None, "no kept samples")
    if modes.get("t5") == "embed" and facts.t5_len.n:
        marks = [(flags.get("t5_max_length"), "--t5-max-length")] if flags.get("t5_max_length") else []
        out["t5_len"] = (plot_int_hist(facts.t5_len, "T5 tokens per caption (kept, EOS included)", "tokens", marks), None)
    else:
        out["t5_len"] = (None, "the T5 stage was off in this run (`--t5 off`), so the `t5_len` column is null")
    if facts.samples:
        out["samples"] = (plot_samples(facts), None)
    elif not facts.samples_screened and facts.kept and not facts.unscreened_samples:
        out["samples"] = (None, "no sample grid: the NSFW stage was off, so no image was screened before being shown "
                                "here (`kiln card --unscreened-samples` draws one anyway)")
    else:
        out["samples"] = (None, "no kept samples eligible for the grid")
    unnamed = set(out) - set(PLOT_NAMES)
    assert not unnamed, f"plots {sorted(unnamed)} are not in pipeline.outdir.PLOT_NAMES: kiln would not know them as its own"
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # No Software/date metadata: the same data gives the same bytes.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def plot_score(h: FloatHist, title: str, xlabel: str, threshold: float | None, threshold_label: str) -> bytes:
    plt = _plt()
    total = sum(h.counts.values())
    nz = np.nonzero(total)[0]
    lo_i, hi_i = int(nz[0]), int(nz[-1]) + 1
    if threshold is not None:
        t_i = int(np.clip((threshold - h.lo) / h.width, 0, h.bins - 1))
        lo_i, hi_i = min(lo_i, t_i), max(hi_i, t_i + 1)
    factor = max(1, -(-(hi_i - lo_i) // 50))  # at most ~50 bars
    lo_i -= lo_i % factor
    n_bars = -(-(hi_i - lo_i) // factor)
    edges = h.lo + np.arange(lo_i, lo_i + n_bars * factor + 1, factor) * h.width
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key, (label, color) in SERIES_STYLE.items():
        seg = h.counts[key][lo_i:lo_i + n_bars * factor]
        if seg.sum() == 0:
            continue
        c = np.zeros(n_bars * factor, np.int64)
        c[: len(seg)] = seg
        c = c.reshape(n_bars, factor).sum(axis=1)
        ax.stairs(c, edges, label=f"{label} (n={int(c.sum()):,})", color=color, fill=key == "kept", alpha=0.45 if key == "kept" else 1.0, linewidth=1.5)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=threshold_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_int_hist(h: IntHist, title: str, xlabel: str, marks: list[tuple[float, str]], log_x: bool = False) -> bytes:
    plt = _plt()
    nz = np.nonzero(h.counts)[0]
    hi = int(nz[-1]) + 1
    factor = max(1, -(-hi // 60))
    hi = -(-hi // factor) * factor
    counts = np.pad(h.counts[:hi], (0, max(0, hi - len(h.counts[:hi])))).reshape(-1, factor).sum(axis=1)
    edges = np.arange(0, hi + 1, factor)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.6, label=f"kept (n={h.n:,})")
    for x, label in marks:
        ax.axvline(x, linestyle="--", linewidth=1.2, color="black")
        ax.annotate(label, (x, ax.get_ylim()[1] * 0.9), rotation=90, fontsize=7, ha="right", va="top")
    if log_x:
        ax.set_xscale("symlog")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_image_sizes(facts: Facts, image_size: int | None) -> bytes:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    h = facts.shorter_side
    top = int(np.nonzero(h.counts)[0][-1]) + 1
    # log-spaced integer bins [edges[i], edges[i+1]) px from 1 to the largest side
    edges = np.unique(np.concatenate([np.geomspace(1, top, 50).astype(np.int64), [top + 1]]))
    counts = np.add.reduceat(h.counts[: edges[-1]], edges[:-1])
    a1.stairs(counts, edges, fill=True, alpha=0.6, color="tab:blue", label=f"kept (n={h.n:,})")
    for x in (64, 256, 1024):
        a1.axvline(x, linestyle=":", color="black", linewidth=1)
        a1.annotate(f"≥{x}: {h.at_least(x):,}", (x, 0), xytext=(3, 30), textcoords="offset points", rotation=90, fontsize=7)
    if image_size:
        a1.axvline(image_size, linestyle="--", color="tab:red", linewidth=1.2, label=f"--image-size {image_size}")
    a1.set_xscale("log")
    a1.set_xlim(left=16)
    a1.set_xlabel("shorter side of the downloaded image, px (log)")
    a1.set_ylabel("samples")
    a1.set_title("Original image size (kept)")
    a1.legend(fontsize=8)
    a2.pcolormesh(wh_edges(), wh_edges(), np.log10(1 + facts.wh.T), cmap="viridis")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("width, px")
    a2.set_ylabel("height, px")
    a2.set_title("width × height (log10(1 + count))")
    fig.tight_layout()
    return _png(fig)


def plot_samples(facts: Facts) -> bytes:
    from PIL import Image

    plt = _plt()
    picks = facts.samples
    cols = 4
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.1), squeeze=False)
    by_tar = collections.defaultdict(list)
    for i, (_, uid, tar_rel, _, _) in enumerate(picks):
        by_tar[tar_rel].append((i, uid))
    images = {}
    for tar_rel, items in sorted(by_tar.items()):
        with FileSystems.open(join(facts.dataset_dir, tar_rel)) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for i, uid in items:
                for ext in IMAGE_EXTS:
                    m = members.get(f"{uid}.{ext}")
                    if m is not None:
                        images[i] = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                        break
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(picks):
            continue
        if k in images:
            ax.imshow(np.asarray(images[k]))
        caption = picks[k][3]
        if len(caption) > 110:
            caption = caption[:107] + "..."
        lines = textwrap.wrap(caption, 34)
        if len(lines) > 3:
            lines = lines[:3]
            lines[-1] = lines[-1][:31] + "..."
        ax.set_title("\n".join(lines), fontsize=7)
    fig.tight_layout()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs a caption uses that the font lacks
        return _png(fig)
