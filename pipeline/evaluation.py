"""The `kiln eval` command: train.eval's suite, statistics, sweep and report, with CLIP score, FID
and KID from kiln's metrics module.

train/ imports nothing from embed/, filters/ or pipeline/ (docs/DESIGN.md), so train.eval takes
those metrics as `train.eval.MetricHooks`; this module -- pipeline/ composes the packages -- fills
them in from pipeline.evalmetrics (imported only when --clip or --features asks for it) and turns a
model spec it cannot load into one line (exit 2).
Everything else, and the command's documentation, is in train/eval.py and docs/eval.md.
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.errors import UserError, one_line

__all__ = ["main_eval", "metric_hooks"]


class MetricsError(UserError):
    """A --clip or --features spec the metrics module cannot load."""


def metric_hooks(models_dir: str | None = None, module=None):
    """train.eval.MetricHooks over kiln's metrics module (pipeline.evalmetrics, unless `module` is
    given). `models_dir`: `--models DIR`, where registry names resolve (as for `kiln prepare`)."""
    from train.eval import MetricHooks

    if module is None:
        from pipeline import evalmetrics as module
    m = module

    def load(flag: str, spec: str, loader):
        try:
            return loader(spec, models_dir=models_dir)
        except UserError:  # the metrics module's own one-line errors (MetricModelError, ModelNotHere)
            raise
        except (ValueError, OSError) as err:  # e.g. filters' ModelLoadError, an unreadable file
            text = one_line(err)
            raise MetricsError(text if text.startswith(flag) else f"{flag} {spec}: {text}") from err

    def load_clip(spec: str):
        clip = load("--clip", spec, m.load_clip)
        return lambda images, captions: np.asarray(m.clip_score(list(images), list(captions), clip), dtype=np.float64)

    def load_features(spec: str):
        extractor = load("--features", spec, m.load_feature_extractor)
        return lambda images: np.asarray(extractor.features(list(images)), dtype=np.float64)

    def kid(a, b, *, subset_size: int, subsets: int, seed: int):
        mean, std = m.kid(a, b, subset_size=subset_size, subsets=subsets, seed=seed)
        return float(mean), float(std)

    return MetricHooks(load_clip=load_clip, load_features=load_features, fid=lambda a, b: float(m.fid(a, b)), kid=kid)


def main_eval(args: argparse.Namespace) -> int:
    """`kiln eval` (train.args.add_eval_args): train.eval.main_eval with the metrics handed in."""
    from train.eval import main_eval as run

    hooks = None
    if getattr(args, "clip", None) or getattr(args, "features", None):
        hooks = metric_hooks(getattr(args, "models", None))
    return run(args, hooks)
