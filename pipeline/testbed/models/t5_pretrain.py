"""A tiny T5 encoder that is actually pretrained: T5's span corruption on text only, a few CPU minutes.

`build_tiny_t5_pretrained(out_dir, seed)` writes a folder in exactly the random tiny T5's format
(`pipeline.testbed.models.t5`: spiece.model, tokenizer.json, tokenizer_config.json, config.json,
model.safetensors, model_card.json), so `kiln prepare --t5-model local:OUT_DIR` and `kiln
embed-prompts --t5-model local:OUT_DIR` load it unchanged. What differs is the weights:

  - the tokenizer files are the random builder's, byte for byte (the same seeded SentencePiece
    vocabulary, built by `build_tiny_t5` into a scratch folder and copied);
  - the encoder has the random one's config (TINY_T5_CONFIG: d_model 64, 2 layers, ...) and sits in
    a `T5ForConditionalGeneration` with a 1-layer decoder and an untied LM head (T5 v1.1);
  - trained with T5's span-corruption objective (`random_spans_noise_mask`: noise density 0.15,
    mean noise span 3) -- each noise span replaced by one sentinel in the input, the target the
    sentinels followed by the spans they hide, then EOS. The vocabulary has no extra_ids
    (the random builder passes extra_ids=0), so SENTINELS sentinel ids are appended after the
    tokenizer's vocabulary, as T5 appends <extra_id_*>, in the training model only: the saved
    encoder's embedding is cut back to the tokenizer's size, so its config.json equals the random one's
    and the tokenizer files need no change (the encoder never sees a sentinel once trained);
  - corpus, text only and seeded: CAPTIONS captions from the synthetic web's grammar
    (`synth._Planner.scene` / `caption`, no images drawn) plus the random builder's own sentences
    (`t5.training_corpus`), each passed through `embed.text.clean_caption`;
  - AdamW, one thread, STEPS steps of BATCH captions (about 300 s on one core).

What it buys (docs/eval.md, "Pretrained vs random-init tiny T5"): span corruption alone teaches
the pooled embedding little word order, since the grammar's colours are free and leave nothing
order-dependent to predict; version 2 gives PARSE_SHARE of each batch a second text-to-text task,
scene parsing (a caption -> `scene_target`, its canonical statement), and the pooled embedding then
says which colour is the shape's (colour probe 0.10 random -> 0.95). `kiln prepare` on the
synthetic web with it, through the trainer: background colour 12% -> 73% at w=3.

`pipeline.testbed.models.cached_pretrained_t5(size)` builds it once into kiln's model cache, as the
other tiny models are built.

Only the encoder is saved (`T5EncoderModel.save_pretrained`). model_card.json says "pretrained",
the steps, the loss at the start and the end, and the corpus. `order_sensitivity` and
`colour_probe` measure what pretraining bought (docs/eval.md, "Pretrained vs random-init tiny T5").

    .venv/bin/python -m pipeline.testbed.models.t5_pretrain OUT_DIR [--seed 0] [--steps N] [--compare RANDOM_DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.compat import ensure_torch_compat
from pipeline.testbed.models.determinism import SYNTH_BASE_URL, reproducible

# Bump when the builder's output would change (corpus, objective, schedule, decoder).
TINY_T5_PRETRAINED_VERSION = 2
# Encoder shapes over TINY_T5_CONFIG. "wide": 4x the non-embedding parameters (d_model 128, heads of
# 32, d_ff 256), for the encoder-vs-U-Net scaling ablation (docs/eval.md); a U-Net reading it needs
# unet.text_dim 128.
SIZES = {"tiny": {}, "wide": {"d_model": 128, "d_kv": 32, "d_ff": 256}}
# Peak learning rate per size. At 3e-3 the wide encoder does not learn the parsing task (loss 0.29
# at the end against the tiny one's 0.09; pooled colour probe 0.03, a bag of words): Adam's best rate
# falls with width, so the wide one trains at a third of it.
SIZE_LR = {"tiny": 3e-3, "wide": 1e-3}

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN = 3.0
SENTINELS = 16  # more than any caption's span count (<= 64 tokens -> <= 4 spans)
CAPTIONS = 40_000
STEPS = 3000
BATCH = 64
LR = SIZE_LR["tiny"]
WARMUP = 100
DECODER_LAYERS = 1
MAX_TOKENS = 64
# The share of each batch given to the scene-parsing task (the rest: span corruption). 0 = span corruption only.
PARSE_SHARE = 0.5
OBJECTIVES = ("span", "span+parse")
_ORDER = {"left": 0, "top": 0, "center": 1, "right": 2, "bottom": 2}
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHROMATIC = ("red", "green", "blue", "yellow", "orange", "purple")


def _log(msg: str) -> None:
    print(f"[tiny-t5-pretrained] {msg}", flush=True)


def grammar_captions(seed: int, n: int) -> list[str]:
    """`n` captions from the synthetic web's grammar (scenes planned, never drawn), seeded."""
    from pipeline.testbed.synth import _Planner

    planner = _Planner(random.Random(f"kiln-t5-pretrain-{seed}"), SYNTH_BASE_URL, (0, 0, 0), 8, (16, 64), ("png",))
    out = []
    for _ in range(n):
        w, h = planner.size()
        _, _, desc = planner.scene(w, h)
        out.append(planner.caption(desc))
    return out


def scene_target(bg: str, shapes: list[dict]) -> str:
    """The canonical, order-fixed statement of a scene, the scene-parsing task's target:
    "background green. red star left. blue circle right." -- shapes in reading order (left/top
    first), whatever order or relation word the caption used."""
    parts = [f"background {bg}."]
    for s in sorted(shapes, key=lambda s: _ORDER[s["position"]]):
        parts.append(f"{s['colour']} {s['shape']} {s['position']}.")
    return " ".join(parts)


def grammar_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """`n` (caption, scene_target) pairs from the synthetic web's grammar, seeded, text only."""
    from pipeline.testbed.synth import _Planner

    planner = _Planner(random.Random(f"kiln-t5-parse-{seed}"), SYNTH_BASE_URL, (0, 0, 0), 8, (16, 64), ("png",))
    out = []
    for _ in range(n):
        w, h = planner.size()
        bg, shapes, desc = planner.scene(w, h)
        out.append((planner.caption(desc), scene_target(bg, shapes)))
    return out


def random_spans_noise_mask(length: int, rng: np.random.Generator, density: float = NOISE_DENSITY,
                            mean_span: float = MEAN_NOISE_SPAN) -> np.ndarray:
    """T5's `random_spans_noise_mask` (t5.data.preprocessors): a bool mask over `length` tokens with
    round(length * density) noise tokens in round(noise / mean_span) spans, noise and non-noise
    segments alternating, the first segment non-noise."""
    noise = int(round(length * density))
    noise = min(max(noise, 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    nonnoise = length - noise

    def segments(items: int, k: int) -> np.ndarray:  # `items` split into k positive parts at random
        first = np.zeros(items - 1, dtype=bool)
        first[rng.permutation(items - 1)[: k - 1]] = True
        return np.bincount(np.cumsum(np.concatenate([[0], first])), minlength=k)

    spans = min(spans, noise, nonnoise)
    noise_lengths, nonnoise_lengths = segments(noise, spans), segments(nonnoise, spans)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for keep, drop in zip(nonnoise_lengths, noise_lengths):
        pos += keep
        mask[pos:pos + drop] = True
        pos += drop
    return mask


def span_corrupt(ids: list[int], rng: np.random.Generator, first_sentinel: int, eos: int) -> tuple[list[int], list[int]]:
    """(input ids, target ids) for one sequence of token ids without EOS: each noise span becomes one
    sentinel (first_sentinel, first_sentinel + 1, ...) in the input; the target lists each sentinel
    and the span it replaced; both end in EOS."""
    mask = random_spans_noise_mask(len(ids), rng)
    inputs, targets, sentinel, prev = [], [], first_sentinel, False
    for tok, noisy in zip(ids, mask):
        if noisy:
            if not prev:
                inputs.append(sentinel)
                targets.append(sentinel)
                sentinel += 1
            targets.append(tok)
        else:
            inputs.append(tok)
        prev = bool(noisy)
    return inputs + [eos], targets + [eos]


def _pad(rows: list[list[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids


def _corpus(seed: int, captions: int) -> tuple[list[str], dict]:
    from embed.text import clean_caption
    from pipeline.testbed.models.t5 import training_corpus

    grammar = [c for c in (clean_caption(t) for t in grammar_captions(seed, captions)) if c]
    own = training_corpus(seed)
    return grammar + own, {"grammar_captions": len(grammar), "random_builder_sentences": len(own),
                           "source": "pipeline.testbed.synth grammar (text only, seeded) + pipeline.testbed.models.t5.training_corpus"}


@reproducible
def build_tiny_t5_pretrained(out_dir: str | Path, seed: int = 0, steps: int = STEPS, captions: int = CAPTIONS,
                             batch: int = BATCH, lr: float | None = None, objective: str = "span+parse",
                             size: str = "tiny") -> Path:
    """Build the pretrained tiny T5 encoder folder into `out_dir` (replaced if it exists); returns its path.
    `objective`: "span" (span corruption only) or "span+parse" (PARSE_SHARE of each batch rewrites a
    caption to its scene_target, the rest is span corruption). `size`: "tiny" (the random tiny T5's
    config) or "wide" (SIZES["wide"]: d_model 128, the encoder of issue 16's encoder-vs-U-Net scaling
    ablation; same vocabulary, same pretraining)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, not {size!r}")
    lr = SIZE_LR[size] if lr is None else lr
    ensure_torch_compat()
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5ForConditionalGeneration

    from embed.t5 import quiet_hf_progress
    from pipeline.testbed.models.t5 import EOS_ID, PAD_ID, TINY_T5_CONFIG, UNK_ID, build_tiny_t5

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="kiln-t5-vocab-") as tmp:
        random_dir = build_tiny_t5(Path(tmp) / "t5", seed=seed)
        for name in _TOKENIZER_FILES:
            if (random_dir / name).exists():
                shutil.copyfile(random_dir / name, out / name)
        random_config = json.loads((random_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    vocab = len(tokenizer)

    texts, corpus_info = _corpus(seed, captions)
    encoded = [ids[: MAX_TOKENS - 1] for ids in tokenizer(texts, add_special_tokens=False).input_ids if len(ids) >= 2]
    rng = np.random.default_rng(seed)
    parse_share = PARSE_SHARE if objective == "span+parse" else 0.0
    parsed: list[tuple[list[int], list[int]]] = []
    if parse_share:
        from embed.text import clean_caption

        pairs_text = [(clean_caption(c), t) for c, t in grammar_pairs(seed, captions)]
        pairs_text = [(c, t) for c, t in pairs_text if c]
        src = tokenizer([c for c, _ in pairs_text], add_special_tokens=False).input_ids
        tgt = tokenizer([t for _, t in pairs_text], add_special_tokens=False).input_ids
        parsed = [(a[: MAX_TOKENS - 1] + [EOS_ID], b[: MAX_TOKENS - 1] + [EOS_ID]) for a, b in zip(src, tgt)]
        corpus_info = {**corpus_info, "parse_pairs": len(parsed), "parse_share": parse_share}
    n_parse = int(round(batch * parse_share))

    shape = {**TINY_T5_CONFIG, **SIZES[size]}
    common = {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "decoder_start_token_id": PAD_ID, **shape}
    train_config = T5Config(vocab_size=vocab + SENTINELS, num_decoder_layers=DECODER_LAYERS, tie_word_embeddings=False,
                            is_encoder_decoder=True, use_cache=False, **common)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(train_config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * max(0.05, 0.5 * (1 + np.cos(np.pi * min(s, steps) / max(steps, 1)))))

    losses = []
    t0 = time.monotonic()
    order = rng.permutation(len(encoded))
    cursor = 0
    for step in range(steps):
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(encoded)), 0
        pairs = [span_corrupt(encoded[i], rng, vocab, EOS_ID) for i in order[cursor:cursor + batch - n_parse]]
        cursor += batch - n_parse
        if n_parse:
            pairs += [parsed[i] for i in rng.integers(0, len(parsed), n_parse)]
        inputs = _pad([p[0] for p in pairs], PAD_ID)
        labels = _pad([p[1] for p in pairs], -100)
        loss = model(input_ids=inputs, attention_mask=(inputs != PAD_ID).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 500 == 0 or step == steps - 1:
            _log(f"step {step}/{steps} loss {losses[-1]:.3f} ({time.monotonic() - t0:.0f} s)")
    seconds = time.monotonic() - t0
    window = max(1, min(50, steps // 10))
    start_loss, end_loss = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    _log(f"{steps} steps in {seconds:.1f} s; span-corruption loss {start_loss:.3f} -> {end_loss:.3f}")

    # The encoder alone, in the random builder's exact config; sentinel rows dropped from the embedding.
    enc_config = T5Config(vocab_size=vocab, is_encoder_decoder=False, use_cache=False, **common)
    encoder = T5EncoderModel(enc_config)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.") and k != "encoder.embed_tokens.weight"}
    state["shared.weight"] = model.shared.weight[:vocab].detach().clone()
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "encoder.embed_tokens.weight"]:
        raise RuntimeError(f"encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    encoder.eval()
    with quiet_hf_progress():
        encoder.save_pretrained(str(out), safe_serialization=True)
    saved = json.loads((out / "config.json").read_text())
    want = {**random_config, **SIZES[size]}
    if {k: v for k, v in saved.items() if k != "_name_or_path"} != {k: v for k, v in want.items() if k != "_name_or_path"}:
        raise RuntimeError("the pretrained encoder's config.json differs from the random tiny T5's (and its size's)")

    card = {
        "what": "tiny T5 v1.1-shaped encoder PRETRAINED with T5 span corruption on text-only synthetic captions "
                "(not random init); the random tiny T5's SentencePiece vocabulary; for tests only",
        "builder": "pipeline/testbed/models/t5_pretrain.py",
        "version": TINY_T5_PRETRAINED_VERSION,
        "seed": seed,
        "vocab_size": vocab,
        "special_ids": {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID},
        "config": shape,
        "size": size,
        "pretraining": {
            "objective": "span corruption (T5 random_spans_noise_mask)" + (
                f" + scene parsing ({parse_share:.0%} of each batch: caption -> its canonical scene statement, "
                "t5_pretrain.scene_target)" if parse_share else ""),
            "objective_name": objective,
            "noise_density": NOISE_DENSITY,
            "mean_noise_span_length": MEAN_NOISE_SPAN,
            "sentinels": f"{SENTINELS} ids appended after the tokenizer's {vocab} (the vocab has no extra_ids); "
                         "dropped from the saved encoder",
            "decoder_layers": DECODER_LAYERS,
            "optimizer": {"name": "AdamW", "lr": lr, "betas": [0.9, 0.98], "weight_decay": 0.01, "warmup_steps": WARMUP,
                          "schedule": "linear warmup, cosine decay to 5%", "grad_clip": 1.0},
            "steps": steps,
            "batch": batch,
            "max_tokens": MAX_TOKENS,
            "loss_start": round(start_loss, 4),
            "loss_first_step": round(losses[0], 4),
            "loss_uniform_guess": round(float(np.log(vocab + SENTINELS)), 4),
            "loss_end": round(end_loss, 4),
            "loss_window_steps": window,  # loss_start / loss_end: mean over the first / last `window` steps
        },
        "corpus": {**corpus_info, "sequences": len(encoded)},
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    _log(f"wrote {out} (pretraining {seconds:.1f} s on {torch.get_num_threads()} thread(s))")
    return out


# -- what pretraining bought -------------------------------------------------------------------


def swap_pairs(n: int = 200, seed: int = 1) -> list[tuple[str, str]]:
    """`n` caption pairs that differ only by swapping the shape's colour and the background's
    ("a red circle on a green background" / "a green circle on a red background"), both chromatic,
    in the synthetic web's caption templates."""
    from pipeline.testbed.synth import SHAPES, _TEMPLATES, _article

    rng = random.Random(f"kiln-t5-swap-{seed}")
    out = []
    for _ in range(n):
        a, b = rng.sample(CHROMATIC, 2)
        shape, template = rng.choice(SHAPES), rng.choice(_TEMPLATES)
        out.append(tuple(template.format(f"{_article(x)} {x} {shape} on {_article(y)} {y} background") for x, y in ((a, b), (b, a))))
    return out


def order_sensitivity(embedder, pairs: list[tuple[str, str]]) -> dict:
    """Mean pooled cosine (mean over tokens) and mean per-token cosine (pairs of equal token count)
    between the two captions of each pair: near 1 = the encoder ignores which word is where."""
    def cos(x, y):
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    embs = [[r.array.astype(np.float64) for r in embedder.embed(list(p))] for p in pairs]
    mean_pooled = np.mean([e.mean(0) for pair in embs for e in pair], axis=0)
    mean_token = np.concatenate([e for pair in embs for e in pair]).mean(0)
    pooled, centred, token, token_centred = [], [], [], []
    for a, b in embs:
        pooled.append(cos(a.mean(0), b.mean(0)))
        centred.append(cos(a.mean(0) - mean_pooled, b.mean(0) - mean_pooled))
        if len(a) == len(b):
            token.append(np.mean([cos(x, y) for x, y in zip(a, b)]))
            token_centred.append(np.mean([cos(x - mean_token, y - mean_token) for x, y in zip(a, b)]))
    return {"pairs": len(pairs), "pooled_cosine": float(np.mean(pooled)), "token_cosine": float(np.mean(token)),
            "token_pairs": len(token), "pooled_cosine_centred": float(np.mean(centred)),
            "token_cosine_centred": float(np.mean(token_centred))}


def _features(embedder, captions: list[str], width: int) -> np.ndarray:
    """Pooled mean and the first `width` token vectors (zero-padded), concatenated."""
    rows = []
    for r in embedder.embed(captions):
        e = r.array.astype(np.float32)
        tokens = np.zeros((width, e.shape[1]), np.float32)
        tokens[: min(width, len(e))] = e[:width]
        rows.append(np.concatenate([e.mean(0), tokens.ravel()]))
    return np.stack(rows)


def colour_probe(embedder, per_ordering: int = 10, seed: int = 2) -> dict:
    """Can the SHAPE's colour (6 chromatic classes, chance 1/6) be read from the embedding of a
    two-colour caption ("a red circle on a green background", in the web's caption templates) whose
    word order was never seen? For each pair of colours and each shape, one order is in the training
    set and the other, swapped, in the test set, `per_ordering` captions each. A bag-of-words encoder
    embeds a test caption like its training twin, whose shape colour is the test's background colour,
    so it scores near 0; one that carries word order can score near 1. Reported: held-out accuracy
    of a linear softmax probe on the standardised pooled embedding, and on pooled + per-position token
    vectors; and of the nearest training caption by raw pooled cosine."""
    import itertools

    import torch

    from pipeline.testbed.synth import _TEMPLATES, SHAPES, _article

    rng = random.Random(f"kiln-t5-probe-{seed}")
    train, test = [], []
    for (a, b), shape in itertools.product(itertools.combinations(CHROMATIC, 2), SHAPES):
        first, second = ((a, b), (b, a)) if rng.random() < 0.5 else ((b, a), (a, b))
        for split, (x, z) in ((train, first), (test, second)):
            for _ in range(per_ordering):
                desc = f"{_article(x)} {x} {shape} on {_article(z)} {z} background"
                split.append((rng.choice(_TEMPLATES).format(desc), CHROMATIC.index(x)))
    n_train, n_test = len(train), len(test)
    caps = [c for c, _ in train + test]
    labels = [y for _, y in train + test]
    width = 12
    x_all = _features(embedder, caps, width)
    y = torch.tensor(labels)
    out = {"train": n_train, "test": n_test, "classes": len(CHROMATIC)}
    # Nearest neighbour by raw pooled cosine (no standardising): the test caption's closest training caption.
    d = embedder.d_model
    p = x_all[:, :d] / np.linalg.norm(x_all[:, :d], axis=1, keepdims=True)
    nearest = (p[n_train:] @ p[:n_train].T).argmax(1)
    out["pooled_nearest_neighbour_accuracy"] = float(np.mean(np.array(labels)[nearest] == np.array(labels[n_train:])))
    for name, cols in (("pooled", slice(0, d)), ("pooled_and_tokens", slice(0, None))):
        x = torch.tensor(x_all[:, cols])
        mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
        x = (x - mu) / sd
        gen = torch.Generator().manual_seed(seed)
        lin = torch.nn.Linear(x.shape[1], len(CHROMATIC))
        with torch.no_grad():
            lin.weight.normal_(0, 0.01, generator=gen)
            lin.bias.zero_()
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(lin(x[:n_train]), y[:n_train]) + 1e-3 * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            out[f"{name}_accuracy"] = float((lin(x[n_train:]).argmax(1) == y[n_train:]).float().mean())
    return out


def compare(random_dir: str | Path, pretrained_dir: str | Path) -> dict:
    """order_sensitivity and colour_probe for both encoders, loaded as kiln prepare loads them."""
    ensure_torch_compat()
    from embed.t5 import T5Embedder

    report = {}
    pairs = swap_pairs()
    for name, path in (("random_init", random_dir), ("pretrained", pretrained_dir)):
        emb = T5Embedder(f"local:{path}", device="cpu", dtype="float32")
        report[name] = {"order": order_sensitivity(emb, pairs), "probe": colour_probe(emb)}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the pretrained tiny T5 encoder (span corruption, text only).")
    parser.add_argument("dir", help="output directory (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate [SIZE_LR: 3e-3 tiny, 1e-3 wide]")
    parser.add_argument("--objective", choices=OBJECTIVES, default="span+parse",
                        help="span corruption only, or with the scene-parsing task [span+parse]")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny",
                        help="tiny: the random tiny T5's shape; wide: d_model 128 [tiny]")
    parser.add_argument("--compare", metavar="RANDOM_DIR", help="then measure it against this random tiny T5 folder")
    args = parser.parse_args(argv)
    try:  # once, before any inter-op work (as build.py's main): a fresh interpreter allows it
        import torch

        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    t0 = time.monotonic()
    out = build_tiny_t5_pretrained(args.dir, seed=args.seed, steps=args.steps, lr=args.lr, objective=args.objective,
                                   size=args.size)
    _log(f"built in {time.monotonic() - t0:.1f} s: use --t5-model local:{out}")
    if args.compare:
        print(json.dumps(compare(args.compare, out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
