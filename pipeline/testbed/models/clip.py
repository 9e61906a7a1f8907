"""Tiny local models for tests and the demo: a CLIP trained on the synthetic web, and an NSFW head.

`build_tiny_clip(out_dir)` trains a small open_clip model contrastively, on CPU, on images and
captions from `pipeline.testbed.synth` (procedural scenes whose captions state the background colour and the
shapes), and writes it in open_clip's own folder schema, so that `local-dir:OUT_DIR` is loaded by the
real open_clip loader:

    open_clip_config.json          {"model_cfg": ..., "preprocess_cfg": ...}
    open_clip_model.safetensors    the weights
    calibration.json               held-out separation of true vs mismatched pairs, and the
                                   recommended `min_clip_similarity` for this model

Its similarity genuinely separates an image's own caption from another image's caption (one with a
different background colour); the builder measures that on held-out rows through `ClipScorer`
(local-dir loading, BGR input, kiln's preprocessing) and refuses to finish if fewer than 95% of true
pairs are above, or fewer than 95% of mismatched pairs below, the recommended threshold.

`build_nsfw_head(out_dir, input_dim)` writes a seeded random-init `filters.nsfw.NsfwHead` (LAION's
H14 layout) whose scores are low (~0.1) and vary across inputs. It is NOT a classifier.

Both are functions of the seed: the same seed gives the same bytes under `build.deterministic`
(one thread, deterministic kernels) in a fresh interpreter (`build.run_isolated`); the cached copies
come from `pipeline.testbed.models.cached_test_models()`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.compat import ensure_torch_compat
from pipeline.testbed.models.determinism import reproducible

# Bump when the builder's output would change (config, data, training): cached copies are rebuilt.
TINY_CLIP_VERSION = 2
NSFW_HEAD_VERSION = 1

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
TINY_PREPROCESS_CFG = {
    "size": 64,
    "mode": "RGB",
    "mean": list(OPENAI_MEAN),
    "std": list(OPENAI_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}

# Training recipe (CPU, one thread: ~45 s). Fixed steps and no clock anywhere, so a build is a
# function of the seed (on a given torch build; see build.py for the rest).
_ROWS, _HELD_OUT = 2400, 400
_SIZE_RANGE = (96, 256)
_STEPS, _BATCH, _LR, _WARMUP, _WD = 400, 128, 2e-3, 30, 0.05
_MIN_RATE = 0.95


def _log(msg: str) -> None:
    print(f"[tiny-clip] {msg}", flush=True)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _load_synthetic(root: Path, rows: int, seed: int):
    """(captions, backgrounds, BGR uint8 arrays) of a fresh synthetic web with no failures."""
    import cv2
    import pyarrow.parquet as pq

    from pipeline.testbed.models.determinism import SYNTH_BASE_URL
    from pipeline.testbed.synth import synthesize

    web = synthesize(root, rows, seed=seed, failure_rate=0.0, size_range=_SIZE_RANGE, base_url=SYNTH_BASE_URL)
    gt = pq.read_table(web.ground_truth_path, columns=["TEXT", "background", "image_file"]).to_pylist()
    images = [cv2.imread(str(web.images_dir / r["image_file"]), cv2.IMREAD_COLOR) for r in gt]
    if any(im is None for im in images):
        raise RuntimeError("could not decode a synthetic image")
    return [r["TEXT"] for r in gt], [r["background"] for r in gt], images


def _mismatch(backgrounds: list[str], rng: np.random.Generator) -> np.ndarray:
    """For each row, another row whose background colour differs."""
    bg = np.array(backgrounds)
    out = np.empty(len(bg), dtype=np.int64)
    for i in range(len(bg)):
        cands = np.flatnonzero(bg != bg[i])
        out[i] = cands[rng.integers(len(cands))]
    return out


def _quantiles(x: np.ndarray) -> dict:
    return {f"p{q:02d}": round(float(np.percentile(x, q)), 6) for q in (1, 5, 25, 50, 75, 95, 99)}


@reproducible
def build_tiny_clip(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    steps: int = _STEPS,
    rows: int = _ROWS,
    held_out: int = _HELD_OUT,
    check: bool = True,
) -> Path:
    """Train the tiny CLIP into `out_dir` (created/overwritten) and return that path.

    `steps`, `rows` and `held_out` exist so a test can build a small one quickly (with
    check=False: it will not separate pairs); the cached test model uses the defaults.
    """
    ensure_torch_compat()
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from filters.clip_similarity import ClipScorer, preprocess_images

    t0 = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("open_clip_model.safetensors", "calibration.json"):
        (out / stale).unlink(missing_ok=True)
    _write_json(out / "open_clip_config.json", {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG})

    with tempfile.TemporaryDirectory(prefix="kiln-tiny-clip-") as tmp:
        texts, backgrounds, images = _load_synthetic(Path(tmp) / "web", rows, seed)
    t_data = time.monotonic() - t0
    n_train = rows - held_out
    size = TINY_PREPROCESS_CFG["size"]
    pix = preprocess_images(images[:n_train], size, channel_order="bgr")  # [n, S, S, 3] RGB uint8

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{out}", device="cpu")  # config only: random init
        tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
        tokens = tokenizer(texts[:n_train])
        mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        x_all = torch.from_numpy(pix).permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std).contiguous()

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": _WD}, {"params": no_decay, "weight_decay": 0.0}], lr=_LR, betas=(0.9, 0.98), eps=1e-6)

        def lr_at(step: int) -> float:
            if step < _WARMUP:
                return _LR * (step + 1) / _WARMUP
            return _LR * 0.5 * (1 + math.cos(math.pi * (step - _WARMUP) / max(1, steps - _WARMUP)))

        rng = np.random.default_rng(seed)
        labels = torch.arange(_BATCH)
        model.train()
        steps_done, loss_v = 0, float("nan")
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            idx = torch.from_numpy(rng.choice(n_train, _BATCH, replace=False))
            img_f = model.encode_image(x_all[idx], normalize=True)
            txt_f = model.encode_text(tokens[idx], normalize=True)
            logits = model.logit_scale.exp().clamp(max=100.0) * img_f @ txt_f.T
            loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100.0))
            steps_done, loss_v = step + 1, loss.item()
            if step % 100 == 0 or step == steps - 1:
                _log(f"step {step:4d} loss {loss_v:.4f} t={time.monotonic() - t0:.1f}s")
        model.eval()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    t_train = time.monotonic() - t0 - t_data
    # One metadata key only: safetensors writes its metadata map in hash order, so several keys would
    # make the bytes (and the recorded sha256) differ between identical builds. No time in calibration.json
    # either: it is part of the model folder, whose bytes are a function of the seed.
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"format": "pt"})

    # Held-out measurement through the real loading path (local-dir:), BGR arrays as the pipeline has them.
    scorer = ClipScorer.from_spec(f"local-dir:{out}", device="cpu", batch_size=128)
    ho_img, ho_txt, ho_bg = images[n_train:], texts[n_train:], backgrounds[n_train:]
    img_emb = scorer.encode_images(ho_img, channel_order="bgr")
    txt_emb = scorer.encode_texts(ho_txt)
    true_sim = np.einsum("nd,nd->n", img_emb, txt_emb)
    mrng = np.random.default_rng(seed + 1)
    mis = _mismatch(ho_bg, mrng)
    mis_sim = np.einsum("nd,nd->n", img_emb, txt_emb[mis])
    other = (np.arange(len(ho_txt)) + 1 + mrng.integers(len(ho_txt) - 1, size=len(ho_txt))) % len(ho_txt)
    any_sim = np.einsum("nd,nd->n", img_emb, txt_emb[other])
    thr = 0.5 * (float(np.percentile(true_sim, 5)) + float(np.percentile(mis_sim, 95)))
    true_above = float(np.mean(true_sim > thr))
    mis_below = float(np.mean(mis_sim < thr))
    any_below = float(np.mean(any_sim < thr))
    elapsed = time.monotonic() - t0
    calibration = {
        "model": "kiln-tiny-clip",
        "builder_version": TINY_CLIP_VERSION,
        "seed": seed,
        "note": "a tiny CLIP trained only on kiln's synthetic web (coloured shapes); for tests and the demo",
        "training": {
            "rows": n_train,
            "steps": steps_done,
            "batch_size": _BATCH,
            "lr": _LR,
            "final_loss": round(loss_v, 6),
        },
        "held_out": {
            "pairs": len(ho_txt),
            "true_pairs": _quantiles(true_sim),
            "mismatched_pairs": _quantiles(mis_sim),
            "mismatched_definition": "another held-out image's caption with a different background colour",
            "any_other_caption": _quantiles(any_sim),
            "true_above_threshold": round(true_above, 4),
            "mismatched_below_threshold": round(mis_below, 4),
            "any_other_below_threshold": round(any_below, 4),
        },
        "min_clip_similarity": round(thr, 6),
        "threshold_rule": "midway between the true pairs' 5th percentile and the mismatched pairs' 95th percentile",
        "weights_sha256": scorer.sha256,
    }
    _write_json(out / "calibration.json", calibration)
    _log(
        f"built in {elapsed:.1f}s (data {t_data:.1f}s, train {t_train:.1f}s, {steps_done} steps): threshold {thr:.4f}, "
        f"true above {true_above:.3f}, mismatched below {mis_below:.3f}, any-other below {any_below:.3f}"
    )
    if check and (true_above < _MIN_RATE or mis_below < _MIN_RATE):
        (out / "calibration.json").rename(out / "calibration.failed.json")
        raise RuntimeError(
            f"tiny CLIP does not separate held-out pairs: {true_above:.3f} of true pairs above and {mis_below:.3f} of "
            f"mismatched pairs below {thr:.4f} (need >= {_MIN_RATE}); see {out / 'calibration.failed.json'}"
        )
    return out


@reproducible
def build_nsfw_head(
    out_dir: str | os.PathLike,
    input_dim: int,
    seed: int = 0,
    calibration_embeddings: np.ndarray | None = None,
    target: float = 0.1,
) -> Path:
    """Write a seeded random-init NSFW head (LAION H14 layout) scoring ~`target` with spread; return the file.

    The last layer is rescaled so that over `calibration_embeddings` (default: seeded random unit
    vectors) the logit has median logit(target) and standard deviation 0.5; the file records
    `activation=sigmoid` in its safetensors metadata. Not a classifier: see nsfw_head.json.
    """
    ensure_torch_compat()
    import torch
    from safetensors.torch import save_file

    from filters.nsfw import LAYOUT, NsfwHead

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = NsfwHead(input_dim)
        for m in head.layers:
            if isinstance(m, torch.nn.Linear):  # He init, zero bias: input differences survive the depth
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                torch.nn.init.zeros_(m.bias)
        if calibration_embeddings is None:
            g = torch.Generator().manual_seed(seed + 1)
            calib = torch.randn(512, input_dim, generator=g)
        else:
            calib = torch.as_tensor(np.asarray(calibration_embeddings, dtype=np.float32))
            if calib.ndim != 2 or calib.shape[1] != input_dim:
                raise ValueError(f"calibration_embeddings must be [n, {input_dim}], got {tuple(calib.shape)}")
        calib = torch.nn.functional.normalize(calib, dim=-1)
        head.eval()
        last = head.layers[16]
        with torch.no_grad():
            raw = head(calib)[:, 0]
            sd = float(raw.std())
            if not sd > 0:
                raise RuntimeError("random NSFW head gives a constant output; try another seed")
            last.weight.mul_(0.5 / sd)
            last.bias.zero_()
            raw = head(calib)[:, 0]
            last.bias.add_(math.log(target / (1 - target)) - float(raw.median()))
            p = torch.sigmoid(head(calib)[:, 0])
    path = out / "nsfw_head.safetensors"
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"activation": "sigmoid"})  # one key: byte-reproducible (see above)
    _write_json(
        out / "nsfw_head.json",
        {
            "what": "random-init NSFW head in LAION's H14_NSFW_Detector layout; NOT a classifier",
            "purpose": "tests and the demo: exercises loading, width checks and thresholds without real weights",
            "layout": LAYOUT,
            "input_dim": input_dim,
            "seed": seed,
            "activation": "sigmoid",
            "builder_version": NSFW_HEAD_VERSION,
            "calibrated_on": "random unit vectors" if calibration_embeddings is None else f"{len(calib)} given embeddings",
            "punsafe_on_calibration": {"min": float(p.min()), "median": float(p.median()), "max": float(p.max())},
        },
    )
    return path
