"""A tiny Detoxify-format caption toxicity model, built and trained locally in seconds.

`build_tiny_detoxify(out_dir, seed)` writes a folder that `filters.toxicity.ToxicityScorer` loads
with `model="local:<out_dir>"` (and kiln with `--toxicity-model local:<out_dir>`) with no network:

    checkpoint.ckpt         torch.save({"config": ..., "state_dict": ...}) -- Detoxify's checkpoint
                            layout; only dicts, lists, strings, ints and tensors, so it loads with
                            torch.load(weights_only=True)
    config.json             the transformers BertConfig (hidden 64, 2 layers, 2 heads, 6 labels)
    tokenizer.json,         a BertTokenizer over an explicit WordPiece vocabulary (every word of the
    tokenizer_config.json,  training corpus, plus single characters and ##characters so an unseen
    vocab.txt               word splits into pieces instead of becoming [UNK])
    model_card.json         what it is, how it was trained, and the held-out check it passed

The training set is `pipeline.testbed.toxic_captions.training_set`: clean captions from the synthetic web
(its "ok" rows, plus every caption a shapeless scene can get -- the planted decompression bomb's --
since a row that fails elsewhere must not look toxic for want of training text; some with friendly
phrases attached) and toxic captions made from TRAIN_PHRASES. The builder then checks
generalisation on captions it never trained on -- HELDOUT_PHRASES around unseen clean descriptions
must be flagged (>= 95%), unseen clean captions must not (<= 1%), nor those with a held-out friendly
phrase (<= 5%) -- and retrains from another initialisation if not (see `build_tiny_detoxify`).

Deterministic for a seed: the same bytes in every file, on a given machine and library versions
(`reproducible`: one thread, deterministic kernels, seeded RNGs; `build.run_isolated` adds a fresh
interpreter, which is how the cached test model is built).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

from filters.toxicity import save_detoxify_checkpoint, sha256_file
from pipeline.compat import ensure_torch_compat
from pipeline.testbed.models.determinism import SYNTH_BASE_URL, reproducible
from pipeline.testbed.toxic_captions import (
    HELDOUT_BENIGN,
    HELDOUT_PHRASES,
    LABELS,
    TRAIN_BENIGN,
    TRAIN_PHRASES,
    benign_caption,
    toxic_caption,
    training_set,
)

# Detoxify's "original" checkpoints name their classes after the Jigsaw columns; Detoxify renames
# them (toxic -> toxicity, severe_toxic -> severe_toxicity, identity_hate -> identity_attack).
JIGSAW_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
MODEL_TYPE = "kiln-tiny-detoxify-bert"  # informational: a local: folder supplies config + tokenizer
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_LENGTH = 128
HELDOUT_TOXIC_MIN = 0.8  # mean toxicity of held-out toxic captions
CLEAN_MAX = 0.2  # mean toxicity of unseen clean captions
# Decisions, as the pipeline makes them (max over the labels > 0.5): a low mean can hide a few
# percent of clean captions scored 0.99, which is what a filter test then trips over.
HELDOUT_TOXIC_FLAGGED_MIN = 0.95
CLEAN_FLAGGED_MAX = 0.01
BENIGN_FLAGGED_MAX = 0.05  # clean captions with a held-out friendly phrase ("you talented painter")
EPOCHS, LR = 8, 2e-3
BENIGN_FRACTION = 0.5  # of the clean training captions, decorated with a friendly phrase
ATTEMPTS = 4


def _clean_captions(seed: int, rows: int) -> list[str]:
    """Captions of the synthetic web's "ok" rows (tiny PNGs: the text is all that is used)."""
    import pyarrow.parquet as pq

    from pipeline.testbed.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="kiln-tox-synth-") as tmp:
        web = synthesize(tmp, rows=rows, seed=seed, failure_rate=0.0, size_range=(16, 24), formats=("png",), min_size=8,
                         base_url=SYNTH_BASE_URL)
        table = pq.read_table(web.ground_truth_path, columns=["TEXT", "kind"]).to_pylist()
    seen: set[str] = set()
    out = []
    for row in table:
        text = row["TEXT"]
        if row["kind"] == "ok" and text and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _build_vocab(corpus: list[str]) -> dict[str, int]:
    """An explicit WordPiece vocabulary: specials, single characters, ##characters, then every
    lower-cased word of `corpus` (BERT's own normaliser and pre-tokeniser split the words)."""
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for text in corpus:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789") | {c for w in words for c in w})
    tokens = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars] + sorted(words - set(chars))
    return {tok: i for i, tok in enumerate(tokens)}


def _save_tokenizer(out: Path, vocab: dict[str, int]):
    """Save a BertTokenizer over `vocab` and return it reloaded from disk, with its ids checked
    (transformers 5's BertTokenizer(vocab_file=...) silently ignores the file: see PITFALLS.md)."""
    import transformers

    tok = transformers.BertTokenizer(vocab=dict(vocab), do_lower_case=True, model_max_length=MAX_LENGTH)
    tok.save_pretrained(str(out))
    # vocab.txt too, one token per line in id order, for readers that build the tokenizer from it.
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    reloaded = transformers.BertTokenizer.from_pretrained(str(out), local_files_only=True)
    probe = "You stupid IDIOT, a red circle"
    ids = reloaded(probe)["input_ids"]
    expected = [vocab["[CLS]"], vocab["you"], vocab["stupid"], vocab["idiot"], vocab[","], vocab["a"], vocab["red"], vocab["circle"], vocab["[SEP]"]]
    if ids != expected or len(reloaded) != len(vocab) or reloaded.pad_token_id != vocab["[PAD]"]:
        raise RuntimeError(f"tokenizer did not round-trip: {probe!r} -> {ids}, expected {expected}")
    if reloaded.model_max_length != MAX_LENGTH:
        raise RuntimeError(f"tokenizer model_max_length {reloaded.model_max_length} != {MAX_LENGTH}")
    return reloaded


def _scores(model, tokenizer, texts: list[str], batch_size: int = 128):
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", truncation=True, padding=True)
            out.append(torch.sigmoid(model(**enc).logits))
    return torch.cat(out)


def _train(config, enc, targets, train_seed: int, epochs: int, lr: float, evaluate) -> tuple:
    """(model, history): `epochs` epochs of AdamW, linear warm-up over half an epoch, then cosine
    decay to zero; `evaluate(model)` after each epoch gives the history's held-out figures."""
    import torch
    import transformers

    batch_size = 32
    n = len(targets)
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_seed)
        model = transformers.BertForSequenceClassification(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        gen = torch.Generator().manual_seed(train_seed)
        per_epoch = -(-n // batch_size)
        total_steps, warmup = epochs * per_epoch, max(1, per_epoch // 2)
        step = 0
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(0, n, batch_size):
                frac = (step - warmup) / max(1, total_steps - warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr * (step + 1) / warmup if step < warmup else lr * 0.5 * (1 + math.cos(math.pi * frac))
                step += 1
                idx = perm[i : i + batch_size]
                mask = enc["attention_mask"][idx]
                width = int(mask.sum(1).max())
                logits = model(
                    input_ids=enc["input_ids"][idx, :width],
                    token_type_ids=enc["token_type_ids"][idx, :width],
                    attention_mask=mask[:, :width],
                ).logits
                loss = loss_fn(logits, targets[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            history.append({"epoch": epoch, "loss": round(total / n, 5), **evaluate(model)})
    model.eval()
    return model, history


def _passes(figures: dict) -> bool:
    return (figures["heldout_toxic_mean"] > HELDOUT_TOXIC_MIN and figures["clean_mean"] < CLEAN_MAX
            and figures["heldout_toxic_flagged"] >= HELDOUT_TOXIC_FLAGGED_MIN
            and figures["clean_flagged"] <= CLEAN_FLAGGED_MAX and figures["benign_flagged"] <= BENIGN_FLAGGED_MAX)


@reproducible
def build_tiny_detoxify(
    out_dir: str | Path,
    seed: int = 0,
    *,
    clean_rows: int = 1000,
    n_toxic: int = 1000,
    eval_rows: int = 300,
    epochs: int = EPOCHS,
    lr: float = LR,
    benign_fraction: float = BENIGN_FRACTION,
    attempts: int = ATTEMPTS,
    check: bool = True,
) -> Path:
    """Build, train, check and save the tiny Detoxify-format model into `out_dir`; return it.

    A fixed number of epochs (`_train`), then the held-out check (`_passes`): held-out toxic
    captions must score mean toxicity > 0.8 with >= 95% flagged (max over the labels > 0.5), unseen
    clean captions < 0.2 with <= 1% flagged, and clean captions with a held-out friendly phrase
    <= 5% flagged. What a tiny model generalises to depends on its initialisation, so a failed check
    retrains from another initialisation (train seed `seed + 1000 * attempt`; the data stay those of
    `seed`), up to `attempts` times, then raises RuntimeError. Every step is a function of `seed`:
    the same attempts, the same bytes. check=False keeps the first attempt whatever it scores (for a
    test's deliberately small build).
    """
    ensure_torch_compat()
    import torch
    import transformers

    from pipeline.testbed.synth import plain_background_captions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    captions = _clean_captions(seed, clean_rows + eval_rows)
    train_clean, eval_clean = captions[:clean_rows] + plain_background_captions(), captions[clean_rows:]
    examples = training_set(rng, train_clean, n_toxic, benign_fraction=benign_fraction)
    eval_rng = random.Random(seed + 1)
    heldout_toxic = [toxic_caption(eval_rng, c, heldout=True) for c in eval_clean]
    heldout_benign = [benign_caption(eval_rng, c, heldout=True) for c in eval_clean]

    vocab = _build_vocab([t for t, _ in examples] + [p for p, _ in TRAIN_PHRASES] + TRAIN_BENIGN)
    tokenizer = _save_tokenizer(out, vocab)

    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=MAX_LENGTH,
        type_vocab_size=2,
        pad_token_id=vocab["[PAD]"],
        num_labels=len(LABELS),
        problem_type="multi_label_classification",
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    texts = [t for t, _ in examples]
    targets = torch.tensor([y for _, y in examples], dtype=torch.float32)
    enc = tokenizer(texts, return_tensors="pt", truncation=True, padding=True)

    def evaluate(model) -> dict:
        tox, clean, benign = (_scores(model, tokenizer, t) for t in (heldout_toxic, eval_clean, heldout_benign))
        flagged = lambda s: round(float((s.max(1).values > 0.5).float().mean()), 4)  # noqa: E731
        return {"heldout_toxic_mean": round(float(tox[:, 0].mean()), 4), "clean_mean": round(float(clean[:, 0].mean()), 4),
                "heldout_toxic_flagged": flagged(tox), "clean_flagged": flagged(clean), "benign_flagged": flagged(benign)}

    # One thread (`reproducible`): for a model this small it is faster than several (and far faster on
    # a busy machine, where OpenMP workers spin), and the weights' bits do not depend on the core count.
    tried = []
    for attempt in range(max(1, attempts)):
        train_seed = seed + 1000 * attempt
        model, history = _train(config, enc, targets, train_seed, epochs, lr, evaluate)
        tried.append({"train_seed": train_seed, **history[-1]})
        if not check or _passes(history[-1]):
            break
    else:
        raise RuntimeError(f"tiny Detoxify model did not separate held-out toxic from clean captions in {len(tried)} attempts: {tried}")

    probes = [eval_clean[0], heldout_benign[0], toxic_caption(random.Random(seed + 2), eval_clean[1], heldout=False), heldout_toxic[1]]
    probe_scores = _scores(model, tokenizer, probes).tolist()  # the in-memory model, before saving
    ckpt = save_detoxify_checkpoint(
        out, model, JIGSAW_CLASSES, MODEL_TYPE, tokenizer_name="BertTokenizer", name="kiln-tiny-detoxify"
    )

    last = history[-1]
    card = {
        "kind": "tiny-detoxify",
        "labels": list(LABELS),
        "checkpoint_classes": list(JIGSAW_CLASSES),
        "seed": seed,
        "train_seed": train_seed,
        "attempts": tried,
        "train_examples": len(examples),
        "train_toxic": n_toxic,
        "train_phrases": len(TRAIN_PHRASES),
        "heldout_phrases": len(HELDOUT_PHRASES),
        "heldout_benign_phrases": len(HELDOUT_BENIGN),
        "eval_captions": len(eval_clean),
        "epochs": last["epoch"],
        "heldout_toxic_mean": last["heldout_toxic_mean"],
        "clean_mean": last["clean_mean"],
        "heldout_toxic_flagged": last["heldout_toxic_flagged"],
        "clean_flagged": last["clean_flagged"],
        "benign_flagged": last["benign_flagged"],
        "history": history,
        "vocab_size": len(vocab),
        "max_length": MAX_LENGTH,
        "architecture": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128},
        "checkpoint_sha256": sha256_file(ckpt),
        "probes": [{"caption": c, "scores": [round(v, 6) for v in row]} for c, row in zip(probes, probe_scores)],
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny local Detoxify-format toxicity model.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_detoxify(args.out_dir, seed=args.seed)
    card = json.loads((out / "model_card.json").read_text())
    print(f"{out}: epochs={card['epochs']} heldout_toxic_mean={card['heldout_toxic_mean']} clean_mean={card['clean_mean']}")
    print(f"use it with --toxicity-model local:{out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
