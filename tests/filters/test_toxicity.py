"""Caption toxicity scorer (filters/toxicity.py) against the tiny local Detoxify-format model.

The model is the cached tiny one (`cached_test_models()`, built reproducibly by
pipeline/testbed/models/toxicity.py); nothing here touches the network, and the tests that load
models with sockets disabled prove it. What a tiny model decides on one borderline caption differs
between machines (PITFALLS.md), so its quality is asserted as rates with measured tolerances, and
single captions only where the margin is wide."""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from filters.toxicity import (
    DETOXIFY_LABELS,
    ToxicityScorer,
    ToxicityScores,
    max_score,
    save_detoxify_checkpoint,
    sha256_file,
)
from filters.errors import ModelLoadError
from pipeline.testbed.models import cached_test_models
from pipeline.testbed.models.toxicity import (
    JIGSAW_CLASSES,
    MAX_LENGTH,
    _clean_captions,
)
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

ORIGINAL = DETOXIFY_LABELS["original"]


@pytest.fixture(scope="session")
def tiny_dir():
    return Path(cached_test_models()["toxicity"])


@pytest.fixture(scope="session")
def scorer(tiny_dir):
    return ToxicityScorer(f"local:{tiny_dir}")


@pytest.fixture(scope="session")
def unseen_clean():
    """Clean captions from a different synthetic web than the model's training data."""
    return _clean_captions(seed=12345, rows=200)


@pytest.fixture
def no_network(monkeypatch):
    """Every way of opening a connection or resolving a name raises; attempts are recorded."""
    attempts = []

    def refuse(what):
        def _refuse(*args, **kwargs):
            attempts.append((what, args[1:] if what.startswith("socket.") else args))
            raise OSError(f"network disabled in this test ({what})")

        return _refuse

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def _mixed_captions(n: int = 70, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    base = _clean_captions(seed=seed, rows=n)
    out = []
    for i, c in enumerate(base[:n]):
        if i % 3 == 0:
            c = toxic_caption(rng, c)
        elif i % 5 == 0:
            c = benign_caption(rng, c)
        if i % 7 == 0:
            c = " ".join([c] * rng.randint(2, 8))  # a spread of lengths, some past max_length
        out.append(c)
    out.append("x")
    out.append("")
    return out


# ---------------------------------------------------------------------------------------------
# The builder's output


def test_checkpoint_is_detoxify_format_and_weights_only(tiny_dir):
    loaded = torch.load(tiny_dir / "checkpoint.ckpt", map_location="cpu", weights_only=True)
    assert set(loaded) == {"config", "state_dict"}
    args = loaded["config"]["arch"]["args"]
    assert set(args) == {"model_type", "model_name", "tokenizer_name", "num_classes"}
    assert args["model_name"] == "BertForSequenceClassification" and args["num_classes"] == 6
    assert loaded["config"]["dataset"]["args"]["classes"] == JIGSAW_CLASSES
    assert all(isinstance(v, torch.Tensor) for v in loaded["state_dict"].values())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "model_card.json"):
        assert (tiny_dir / name).is_file(), name

    card = json.loads((tiny_dir / "model_card.json").read_text())
    assert card["kind"] == "tiny-detoxify" and card["labels"] == LABELS and card["seed"] == 0
    assert card["heldout_toxic_mean"] > 0.8 and card["clean_mean"] < 0.2
    assert card["train_examples"] > 1000
    assert card["checkpoint_sha256"] == sha256_file(tiny_dir / "checkpoint.ckpt")
    print(f"\nmodel card: epochs={card['epochs']} heldout_toxic_mean={card['heldout_toxic_mean']} clean_mean={card['clean_mean']}")


def test_tokenizer_ids_come_from_the_vocabulary(scorer, tiny_dir):
    vocab = (tiny_dir / "vocab.txt").read_text().splitlines()
    tok = scorer.tokenizer
    assert len(tok) == len(vocab) > 100
    for word in ("idiot", "circle", "background", "hurt"):
        assert tok.convert_tokens_to_ids(word) == vocab.index(word) != tok.unk_token_id
    ids = tok("You stupid idiot")["input_ids"]
    assert ids == [vocab.index(t) for t in ("[CLS]", "you", "stupid", "idiot", "[SEP]")]
    # An unseen word splits into pieces instead of becoming [UNK].
    assert tok.unk_token_id not in tok("zyxwv")["input_ids"]


# ---------------------------------------------------------------------------------------------
# The scorer


def test_shapes_dtypes_labels(scorer, tiny_dir):
    assert scorer.labels == ORIGINAL  # Jigsaw names in the checkpoint, standardised as Detoxify does
    result = scorer.score(["a red circle on a blue background", "you stupid idiot", "i will hurt you"])
    assert isinstance(result, ToxicityScores)
    assert result.labels == ORIGINAL and len(result) == 3
    assert result.scores.dtype == np.float32 and result.scores.shape == (3, 6)
    assert np.all((result.scores >= 0) & (result.scores <= 1))
    # The columns carry the labels' meanings: the threat scores highest on "threat", the insult on
    # "insult" (relative: a tiny model's absolute threat score for a phrase ranged 0.52-0.86 over seeds).
    threat, insult = result.column("threat"), result.column("insult")
    assert threat[2] > 5 * max(threat[0], threat[1])
    assert insult[1] > max(insult[0], insult[2])
    assert result.as_dicts()[1]["insult"] == pytest.approx(float(result.scores[1, 4]))
    empty = scorer.score([])
    assert empty.scores.shape == (0, 6) and empty.scores.dtype == np.float32
    src = scorer.source
    assert src["name"] == f"local:{tiny_dir}" and src["kind"] == "local"
    assert src["weights_path"] == str(tiny_dir / "checkpoint.ckpt")
    assert src["sha256"] == sha256_file(tiny_dir / "checkpoint.ckpt") and len(src["sha256"]) == 64
    assert scorer.max_length == MAX_LENGTH
    assert not scorer.model.training
    auto = ToxicityScorer(f"local:{tiny_dir}", device=None)  # None: CUDA if available, else CPU
    assert auto.device == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TypeError):
        scorer.score([None])  # type: ignore[list-item]


def test_deterministic(scorer, tiny_dir):
    caps = _mixed_captions()
    a = scorer.score(caps).scores
    b = scorer.score(caps).scores
    assert np.array_equal(a, b)
    again = ToxicityScorer(f"local:{tiny_dir}", batch_size=scorer.batch_size).score(caps).scores
    assert np.array_equal(a, again)


def test_batch_size_invariance(tiny_dir):
    caps = _mixed_captions(70)
    lengths = sorted(len(c) for c in caps)
    assert lengths[0] == 0 and lengths[-1] > 400
    results = {bs: ToxicityScorer(f"local:{tiny_dir}", batch_size=bs).score(caps).scores for bs in (1, 7, 64)}
    np.testing.assert_allclose(results[7], results[1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(results[64], results[1], atol=1e-4, rtol=0)
    # Input order is kept even though batches are built from length-sorted captions.
    rev = ToxicityScorer(f"local:{tiny_dir}", batch_size=7).score(caps[::-1]).scores
    np.testing.assert_allclose(rev[::-1], results[1], atol=1e-4, rtol=0)


def _truncated_text(tok, caption: str, max_length: int) -> str:
    ids = tok(caption, truncation=True, max_length=max_length)["input_ids"]
    assert len(ids) == max_length
    text = tok.decode(ids[1:-1])
    assert tok(text)["input_ids"] == ids  # the prefix re-tokenises to exactly the kept tokens
    return text


def test_truncation(scorer, tiny_dir, unseen_clean):
    rng = random.Random(9)
    long = ""
    while len(long) < 5000:
        long += toxic_caption(rng, rng.choice(unseen_clean)) + " . "
    long = long[:5000]
    full = scorer.score([long]).scores
    assert full.shape == (1, 6) and np.all(np.isfinite(full))
    prefix = _truncated_text(scorer.tokenizer, long, scorer.max_length)
    np.testing.assert_allclose(full, scorer.score([prefix]).scores, atol=1e-5, rtol=0)

    short = ToxicityScorer(f"local:{tiny_dir}", max_length=24)
    assert short.max_length == 24
    prefix24 = _truncated_text(short.tokenizer, long, 24)
    np.testing.assert_allclose(short.score([long]).scores, short.score([prefix24]).scores, atol=1e-5, rtol=0)
    assert ToxicityScorer(f"local:{tiny_dir}", max_length=100_000).max_length == MAX_LENGTH  # capped by the model


def test_round_trip_matches_the_in_memory_model(scorer, tiny_dir, tmp_path):
    # The builder recorded scores from the in-memory model before saving it.
    card = json.loads((tiny_dir / "model_card.json").read_text())
    probes = card["probes"]
    loaded = scorer.score([p["caption"] for p in probes]).scores
    np.testing.assert_allclose(loaded, np.array([p["scores"] for p in probes]), atol=1e-5, rtol=0)

    # Save the loaded model again (torch and safetensors forms) and load it back.
    caps = _mixed_captions(30)
    ref = scorer.score(caps).scores
    for as_safetensors in (False, True):
        out = tmp_path / ("st" if as_safetensors else "ckpt")
        path = save_detoxify_checkpoint(out, scorer.model, JIGSAW_CLASSES, "tiny", scorer.tokenizer, safetensors=as_safetensors)
        assert path.name == ("checkpoint.safetensors" if as_safetensors else "checkpoint.ckpt")
        again = ToxicityScorer(f"local:{out}")
        assert again.labels == ORIGINAL and again.source["sha256"] == sha256_file(path)
        np.testing.assert_allclose(again.score(caps).scores, ref, atol=1e-6, rtol=0)
    # local: may name the checkpoint file itself.
    by_file = ToxicityScorer(f"local:{tiny_dir / 'checkpoint.ckpt'}")
    np.testing.assert_array_equal(by_file.score(caps).scores, ref)


def test_matches_detoxify_itself(scorer, tiny_dir, tmp_path, no_network):
    """Detoxify's own loader and predict() on the same checkpoint give the same scores."""
    from detoxify import Detoxify

    loaded = torch.load(tiny_dir / "checkpoint.ckpt", map_location="cpu", weights_only=True)
    loaded["config"]["arch"]["args"]["model_type"] = str(tiny_dir)  # Detoxify reads the config from model_type
    ckpt = tmp_path / "for-detoxify.ckpt"
    torch.save(loaded, ckpt)
    detox = Detoxify(checkpoint=str(ckpt), huggingface_config_path=str(tiny_dir))
    assert detox.class_names == ORIGINAL
    caps = _mixed_captions(20)
    theirs = detox.predict(caps)
    ours = scorer.score(caps)
    for j, label in enumerate(ours.labels):
        np.testing.assert_allclose(ours.scores[:, j], np.array(theirs[label]), atol=1e-5, rtol=0)
    assert no_network == []


def test_load_and_score_with_sockets_disabled(tiny_dir, no_network):
    s = ToxicityScorer(f"local:{tiny_dir}")
    out = s.score(["a blue star on a red background", "shut up, you worthless idiot"])
    assert out.scores[1, 0] > 0.5 > out.scores[0, 0]
    assert no_network == []
    # The guard itself works: a connection attempt is refused and recorded.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9))
    assert len(no_network) == 1


def test_heldout_toxic_and_clean_captions(scorer, unseen_clean):
    rng = random.Random(77)
    toxic = [toxic_caption(rng, c, heldout=True) for c in unseen_clean]
    clean = list(unseen_clean)
    benign = [benign_caption(rng, c, heldout=True) for c in unseen_clean]
    started = time.perf_counter()
    scores = scorer.score(toxic + clean + benign)
    rate = len(scores) / (time.perf_counter() - started)
    m = max_score(scores)
    n = len(unseen_clean)
    toxic_rate = float(np.mean(m[:n] > 0.5))
    clean_rate = float(np.mean(m[n : 2 * n] > 0.5))
    benign_rate = float(np.mean(m[2 * n :] > 0.5))
    print(
        f"\nheld-out toxic flagged {toxic_rate:.3f}, clean flagged {clean_rate:.3f}, clean+held-out friendly phrase "
        f"flagged {benign_rate:.3f} (n={n} each); {rate:.0f} captions/s at batch {scorer.batch_size}"
    )
    # Measured over tiny models of seeds 0-5: toxic flagged 0.98-1.0, clean 0, clean with a held-out
    # friendly phrase 0-0.055 (the builder itself demands >= 0.95, <= 0.01 and <= 0.05 on its own held-out set).
    assert toxic_rate >= 0.95
    assert clean_rate <= 0.01
    assert benign_rate <= 0.10


def test_hub_name_offline_fails_clearly_without_network(monkeypatch, tmp_path, no_network):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local:") as err:
        ToxicityScorer("original")
    assert "--toxicity-model local:" in str(err.value)
    assert no_network == []  # offline: not even a name lookup


def test_hub_name_download_failure_is_a_clear_error(monkeypatch, tmp_path, no_network):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="--toxicity-model local:") as err:
        ToxicityScorer("unbiased")
    assert "toxic_debiased" in str(err.value)  # names what it tried to fetch
    assert no_network, "the download was expected to try (and be refused by the test's guard)"
    assert time.monotonic() - started < 10
    assert not list((tmp_path / "hub").rglob("*.ckpt"))


def test_bad_model_specs(tmp_path, tiny_dir):
    with pytest.raises(ModelLoadError, match="local:"):
        ToxicityScorer("toxic-bert-large")
    with pytest.raises(ModelLoadError, match="does not exist"):
        ToxicityScorer(f"local:{tmp_path / 'missing'}")
    with pytest.raises(ModelLoadError, match="holds none of"):
        ToxicityScorer(f"local:{tmp_path}")  # a folder without a checkpoint
    with pytest.raises(ValueError):
        ToxicityScorer(f"local:{tiny_dir}", batch_size=0)

    # A checkpoint that needs full unpickling is refused, never loaded with weights_only=False.
    bad = tmp_path / "bad"
    bad.mkdir()
    loaded = torch.load(tiny_dir / "checkpoint.ckpt", map_location="cpu", weights_only=True)
    loaded["extra"] = _NotAllowed()
    torch.save(loaded, bad / "checkpoint.ckpt")
    with pytest.raises(ModelLoadError, match="carries code .*_NotAllowed.* refused"):
        ToxicityScorer(f"local:{bad}")

    # A checkpoint whose model name is not a sequence classifier is refused before any import by name.
    odd = tmp_path / "odd"
    odd.mkdir()
    loaded = torch.load(tiny_dir / "checkpoint.ckpt", map_location="cpu", weights_only=True)
    loaded["config"]["arch"]["args"]["model_name"] = "os.system"
    torch.save(loaded, odd / "checkpoint.ckpt")
    with pytest.raises(ModelLoadError, match="model_name"):
        ToxicityScorer(f"local:{odd}")


class _NotAllowed:
    pass


def test_class_names_from_arch_args(tmp_path, tiny_dir, scorer):
    """Detoxify's newer configs name the classes in arch.args (plus identity_classes), not dataset.args."""
    import shutil

    out = tmp_path / "archclasses"
    shutil.copytree(tiny_dir, out)
    loaded = torch.load(out / "checkpoint.ckpt", map_location="cpu", weights_only=True)
    del loaded["config"]["dataset"]["args"]["classes"]
    loaded["config"]["arch"]["args"]["classes"] = JIGSAW_CLASSES[:4]
    loaded["config"]["arch"]["args"]["identity_classes"] = JIGSAW_CLASSES[4:]
    torch.save(loaded, out / "checkpoint.ckpt")
    s = ToxicityScorer(f"local:{out}")
    assert s.labels == ORIGINAL
    caps = ["a red circle", "you stupid idiot"]
    np.testing.assert_array_equal(s.score(caps).scores, scorer.score(caps).scores)


# ---------------------------------------------------------------------------------------------
# max_score and the labelled caption set


def test_max_score_over_a_label_subset():
    s = ToxicityScores(
        labels=list(ORIGINAL),
        scores=np.array([[0.1, 0.0, 0.0, 0.9, 0.2, 0.0], [0.3, 0.0, 0.0, 0.0, 0.7, 0.0], [0.0] * 6], dtype=np.float32),
    )
    np.testing.assert_allclose(max_score(s), [0.9, 0.7, 0.0])
    np.testing.assert_allclose(max_score(s, ["toxicity", "insult"]), [0.2, 0.7, 0.0])
    np.testing.assert_allclose(max_score(s, ["toxicity"]), [0.1, 0.3, 0.0])
    assert max_score(s, ["threat"]).dtype == np.float32
    assert (max_score(s, ["toxicity", "insult"]) > 0.5).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="sexual_explicit"):
        max_score(s, ["sexual_explicit"])
    with pytest.raises(ValueError):
        max_score(s, [])
    assert max_score(ToxicityScores(list(ORIGINAL), np.zeros((0, 6), np.float32)), ["toxicity"]).shape == (0,)


def test_toxic_caption_set():
    assert 25 <= len(TRAIN_PHRASES) + len(HELDOUT_PHRASES) <= 40
    train = {p for p, _ in TRAIN_PHRASES}
    held = {p for p, _ in HELDOUT_PHRASES}
    assert not train & held and not set(TRAIN_BENIGN) & set(HELDOUT_BENIGN)
    for _, labels in TRAIN_PHRASES + HELDOUT_PHRASES:
        assert len(labels) == len(LABELS) == 6 and labels[0] == 1 and set(labels) <= {0, 1}
    assert any(lab[LABELS.index("threat")] for _, lab in HELDOUT_PHRASES)

    rng = random.Random(0)
    cap = toxic_caption(rng, "a red circle on a blue background")
    assert "a red circle on a blue background" in cap and any(p in cap.lower() for p in held)
    assert not any(p in toxic_caption(rng, "x", heldout=True).lower() for p in train)

    clean = [f"a {c} square on a white background" for c in ("red", "green", "blue", "black")]
    data = training_set(random.Random(1), clean, n_toxic=6)
    assert len(data) == 10
    toxic_rows = [(t, y) for t, y in data if y[0] == 1.0]
    assert len(toxic_rows) == 6 and all(len(y) == 6 for _, y in data)
    assert all(any(p in t.lower() for p in train) for t, _ in toxic_rows)
    assert sum(1 for _, y in data if y == [0.0] * 6) == 4
    assert training_set(random.Random(1), clean, n_toxic=6) == data  # deterministic for a seed
