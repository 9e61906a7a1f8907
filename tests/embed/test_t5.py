"""T5Embedder on the tiny local T5 (pipeline/testbed/models/t5.py), caption cleaning, and embed-prompts.

The tiny encoder is built once per module into a temp folder (~3 s) and loaded through the real
transformers loaders, so everything here exercises the code path a T5-XXL folder takes.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embed.errors import ModelLoadError
from embed.t5 import (
    EmbedResult,
    T5Embedder,
    resolve_model_dir,
    weight_files,
    weights_sha256,
)
from embed.text import clean_caption
from pipeline.testbed.models.t5 import build_tiny_t5, prompt_like_text

REPO = Path(__file__).resolve().parents[2]
MAX_LEN = 32  # small, so that ordinary test captions get truncated too


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5") / "model", seed=0)


@pytest.fixture(scope="module")
def embedder(tiny_t5) -> T5Embedder:
    # A small budget and batch cap: ~100 captions make many batches of mixed lengths.
    return T5Embedder(f"local:{tiny_t5}", device="cpu", max_length=MAX_LEN, max_tokens_per_batch=256, max_batch_size=16)


def varied_captions(n: int = 100) -> list[str]:
    rng = random.Random(7)
    base = prompt_like_text(rng, n - 12)
    long = ", ".join(prompt_like_text(rng, 6))  # > MAX_LEN tokens
    return base + [
        long,
        long + " and more",
        "",
        "   ",
        "a",
        "cafÃ© &amp;amp; <b>croissant</b>",
        "tab\tand\nnewline\u00a0nbsp\u200bzero-width",
        "ＦＵＬＬ width and ﬁ ligature",
        "emoji 🐶🌈 and unknown ✓ symbols",
        "A red circle on a blue background",
        "a red circle on a blue background",
        "x " * 200,
    ]


def reference_embedding(embedder: T5Embedder, caption: str) -> np.ndarray:
    """transformers' own path, one caption, no padding and no mask: the reference for bucketing."""
    ids = embedder.tokenizer(clean_caption(caption), truncation=True, max_length=embedder.max_length, return_tensors="pt").input_ids
    with torch.inference_mode():
        hidden = embedder.model(input_ids=ids).last_hidden_state[0]
    return hidden.to(torch.float16).numpy()


# -- the tiny model itself ---------------------------------------------------------------------


def test_tiny_t5_tokenizer_ids_match_sentencepiece(tiny_t5):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny_t5 / "spiece.model"))
    tok = AutoTokenizer.from_pretrained(str(tiny_t5))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert 900 <= len(tok) == sp.get_piece_size() <= 2000
    for text in ("a red circle on a blue background", "an astronaut riding a horse", "café"):
        ids = tok(text).input_ids
        assert ids == sp.encode(text) + [1]  # same pieces as the raw model, EOS appended
        assert sp.decode(ids[:-1]) == text
    assert sp.piece_to_id("▁background") not in (0, 2)  # a known word is a real piece, not <unk>
    config = json.loads((tiny_t5 / "config.json").read_text())
    assert config["vocab_size"] == len(tok) and config["d_model"] == 64 and config["feed_forward_proj"] == "gated-gelu"


def test_tiny_t5_is_deterministic(tiny_t5, tmp_path):
    again = build_tiny_t5(tmp_path / "again", seed=0)
    for name in ("spiece.model", "model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_t5 / name).read_bytes(), name


# -- embedding ---------------------------------------------------------------------------------


def test_bucketed_equals_one_at_a_time(embedder):
    captions = varied_captions()
    results = embedder.embed(captions)
    assert len(results) == len(captions)
    lengths = [r.n_tokens for r in results]
    assert len(set(lengths)) > 10 and max(lengths) == MAX_LEN and min(lengths) == 1
    worst = 0.0
    for caption, r in zip(captions, results):
        ref = reference_embedding(embedder, caption)
        assert r.array.shape == ref.shape == (r.n_tokens, 64)
        assert r.array.dtype == np.float16
        diff = np.abs(r.array.astype(np.float32) - ref.astype(np.float32))
        # Both are float32 results rounded to float16: at most one float16 ulp apart (2^-10 relative).
        np.testing.assert_array_less(diff, 2**-10 * np.abs(ref.astype(np.float32)) + 1e-6, err_msg=caption[:80])
        worst = max(worst, float(diff.max()))
    assert worst < 5e-3


def test_reference_detects_leaking_padding(embedder):
    """Negative control: without the attention mask, padding does change T5's output (so the test
    above would catch a batching bug)."""
    short, long = "a red circle", "a misty lighthouse at dawn, watercolor, oil painting, 4k"
    ids = embedder.tokenizer([short, long], padding=True, return_tensors="pt").input_ids
    with torch.inference_mode():
        unmasked = embedder.model(input_ids=ids).last_hidden_state[0].numpy()
    ref = reference_embedding(embedder, short).astype(np.float32)
    assert np.abs(unmasked[: len(ref)] - ref).max() > 0.05


def test_lengths_match_tokenizer(embedder):
    captions = varied_captions()
    results = embedder.embed(captions)
    assert embedder.tokenize_lengths(captions) == [r.n_tokens for r in results]
    for caption, r in zip(captions, results):
        text = clean_caption(caption)
        assert r.text == text
        full = embedder.tokenizer(text).input_ids
        assert full[-1] == embedder.eos_id
        assert r.n_tokens == min(len(full), MAX_LEN)
        assert r.truncated == (len(full) > MAX_LEN)
        # What is encoded is exactly transformers' truncation=True (content cut, EOS kept).
        ids, _ = embedder._tokenize_clean([text])
        assert ids[0] == embedder.tokenizer(text, truncation=True, max_length=MAX_LEN).input_ids
        assert ids[0][-1] == embedder.eos_id


def test_long_caption_is_truncated_and_flagged(embedder):
    long = "a misty lighthouse at dawn, " * 20
    short = "a misty lighthouse at dawn"
    r_long, r_short = embedder.embed([long, short])
    assert r_long.truncated and r_long.n_tokens == MAX_LEN and r_long.array.shape == (MAX_LEN, 64)
    assert not r_short.truncated and r_short.n_tokens < MAX_LEN
    np.testing.assert_array_equal(r_long.array, reference_embedding(embedder, long))


def test_empty_caption_is_eos_only(embedder):
    (r,) = embedder.embed([" \t "])
    assert r.n_tokens == 1 and r.text == "" and not r.truncated
    assert embedder.embed([]) == []


def test_two_runs_identical(embedder):
    captions = varied_captions(40)
    a = embedder.embed(captions)
    b = embedder.embed(captions)
    assert all(x.array.tobytes() == y.array.tobytes() and x.n_tokens == y.n_tokens for x, y in zip(a, b))


def test_bytes_independent_of_batch_composition(tiny_t5, embedder):
    """DESIGN.md: two runs over the same input give byte-identical shards. In `kiln prepare` the
    captions that share a forward pass depend on Beam's bundle boundaries, which differ from run to
    run, so a caption's stored bytes must be a function of the caption (and model) alone: the same
    whether it is encoded alone, in another order, in other bundles, or under another budget, batch
    cap or window (not merely within one float16 ulp, as `test_bucketed_equals_one_at_a_time`)."""
    captions = varied_captions() + ["", "a", "red", "a dog", "a red dog"]  # widths 1-5: tiny passes too
    want = [r.array.tobytes() for r in embedder.embed(captions)]
    rng = random.Random(11)
    shuffled = list(range(len(captions)))
    rng.shuffle(shuffled)
    bundles = []  # uneven bundles, as Beam's BatchElements makes them
    start = 0
    while start < len(captions):
        size = rng.randint(1, 9)
        bundles.append(shuffled[start:start + size])
        start += size
    other = T5Embedder(f"local:{tiny_t5}", device="cpu", max_length=MAX_LEN, max_tokens_per_batch=48, max_batch_size=5, window=13)
    runs = {
        "one at a time": {i: embedder.embed([c])[0] for i, c in enumerate(captions)},
        "shuffled": dict(zip(shuffled, embedder.embed([captions[i] for i in shuffled]))),
        "uneven bundles": {i: r for b in bundles for i, r in zip(b, embedder.embed([captions[i] for i in b]))},
        "budget 48, batch cap 5, window 13": dict(enumerate(other.embed(captions))),
    }
    for name, results in runs.items():
        changed = [captions[i][:40] for i in range(len(captions)) if results[i].array.tobytes() != want[i]]
        assert not changed, f"{name}: {len(changed)} of {len(captions)} captions' bytes changed, e.g. {changed[:3]}"


def test_float16_overflow_raises_naming_the_caption(tiny_t5):
    emb = T5Embedder(f"local:{tiny_t5}", device="cpu", max_length=MAX_LEN)
    with torch.no_grad():
        emb.model.encoder.final_layer_norm.weight.mul_(1e5)  # outputs ~1e5 > 65504
    caption = "an enormous glowing dragon over a stormy harbor at night, " * 3
    with pytest.raises(ValueError, match="outside float16's finite range") as info:
        emb.embed(["a red circle", caption])
    message = str(info.value)
    assert caption[:80] in message and caption[:81] not in message


def test_bytes_round_trip_with_numpy_only(embedder):
    (r,) = embedder.embed(["a cozy café in Paris at dawn, watercolor"])
    b = r.array.astype("<f2").tobytes()
    assert len(b) == r.n_tokens * 64 * 2
    back = np.frombuffer(b, dtype="<f2").reshape(-1, 64)
    np.testing.assert_array_equal(back, r.array)


def test_source_records_weights(embedder, tiny_t5):
    source = embedder.source
    weights = tiny_t5 / "model.safetensors"
    assert source["spec"] == f"local:{tiny_t5}"
    assert source["weights_path"] == str(weights)
    assert source["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (source["d_model"], source["max_length"]) == (64, MAX_LEN)


def test_sharded_checkpoint_loads_and_hashes(embedder, tiny_t5, tmp_path):
    import shutil

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_t5, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    embedder.model.save_pretrained(str(sharded), max_shard_size="100KB")
    index = sharded / "model.safetensors.index.json"
    main, files = weight_files(sharded)
    assert main == index and len(files) > 2
    # The documented combination: sha256 of `sha256sum INDEX SHARD...` (shards sorted) output.
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    listing = "".join(f"{hashlib.sha256((sharded / n).read_bytes()).hexdigest()}  {n}\n" for n in [index.name, *shards])
    assert weights_sha256(sharded) == hashlib.sha256(listing.encode()).hexdigest()
    other = T5Embedder(str(sharded), device="cpu", max_length=MAX_LEN)  # a plain directory path works too
    caption = "a geometric owl in a museum, stained glass"
    np.testing.assert_array_equal(other.embed([caption])[0].array, embedder.embed([caption])[0].array)
    assert other.source["sha256"] == weights_sha256(sharded)


def test_missing_model_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*huggingface-cli download kiln-test/no-such"):
        resolve_model_dir("kiln-test/no-such-model")
    with pytest.raises(ModelLoadError, match="folder .* does not exist.*local:DIR"):
        resolve_model_dir(f"local:{tmp_path / 'nope'}")
    with pytest.raises(ModelLoadError, match="no T5 weights"):
        weight_files(tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_dir(f"local:{tmp_path}")


def test_tokenizer_that_ignored_its_vocabulary_is_refused(tiny_t5, tmp_path):
    """docs/PITFALLS.md: T5Tokenizer(vocab_file=...) silently ignores the file in transformers 5."""
    import shutil

    from transformers import T5Tokenizer

    broken = tmp_path / "broken"
    shutil.copytree(tiny_t5, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "spiece.model").unlink()
    T5Tokenizer(vocab_file=str(tiny_t5 / "spiece.model")).save_pretrained(str(broken))
    with pytest.raises(ModelLoadError, match="did not load"):
        T5Embedder(f"local:{broken}", device="cpu")


def test_budget_below_max_length_is_refused(tiny_t5):
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        T5Embedder(f"local:{tiny_t5}", device="cpu", max_length=64, max_tokens_per_batch=32)


def test_embed_result_fields(embedder):
    (r,) = embedder.embed(["a red circle"])
    assert isinstance(r, EmbedResult) and r.array.flags.c_contiguous and r.array.base is None


# -- caption cleaning --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("cafÃ©", "café"),  # mojibake (UTF-8 read as Latin-1)
        ("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "The Mona Lisa doesn't have eyebrows."),
        ("&amp;amp;", "&"),  # escaped twice
        ("A &amp; B", "A & B"),
        ("caf&eacute; &#39;latte&#39;", "café 'latte'"),
        ("caf&Atilde;&copy;", "café"),  # entity-encoded mojibake
        ("&lt;b&gt;bold&lt;/b&gt; move", "bold move"),  # escaped formatting tags
        ('<a href="https://x.example.org/a">link</a> text', "link text"),
        ("line one<br/>line two<BR>three", "line one line two three"),
        ("<3 you", "<3 you"),  # not markup: left alone
        ("a < b > c", "a < b > c"),
        ("<my tag> stays", "<my tag> stays"),
        ("  tabs\tand\nnew\r\nlines  ", "tabs and new lines"),
        ("non\u00a0breaking\u2003em\u3000ideographic", "non breaking em ideographic"),
        ("zero\u200bwidth\u200d joiner\ufeff", "zerowidth joiner"),
        ("soft\u00adhyphen", "softhyphen"),
        ("ＦＵＬＬ ﬁne “quotes”", 'FULL fine "quotes"'),
        ("ctrl\x00\x07chars", "ctrlchars"),
        ("Keep Case, punctuation! and https://example.com/x?y=1", "Keep Case, punctuation! and https://example.com/x?y=1"),
        ("", ""),
        (" \t\n ", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean
    assert clean_caption(clean_caption(raw)) == clean_caption(raw)  # idempotent


def test_clean_caption_rejects_non_strings():
    with pytest.raises(TypeError):
        clean_caption(None)  # type: ignore[arg-type]


def test_unescape_is_bounded():
    assert clean_caption("&amp;amp;amp;amp;") == "&amp;"  # three rounds, no more


# -- kiln embed-prompts ------------------------------------------------------------------------


def _args(prompts, out, model, max_length=MAX_LEN):
    import argparse

    from pipeline.embed_prompts import add_embed_prompts_args

    parser = argparse.ArgumentParser()
    add_embed_prompts_args(parser)
    return parser.parse_args([str(prompts), "-o", str(out), "--t5-model", model, "--t5-max-length", str(max_length)])


def test_embed_prompts_writes_readable_parquet(tiny_t5, embedder, tmp_path, capsys):
    from pipeline.embed_prompts import main_embed_prompts

    prompts_file = tmp_path / "prompts.txt"
    prompts = ["a corgi wearing sunglasses", "cafÃ© &amp; croissant ", "a misty lighthouse at dawn, " * 12]
    prompts_file.write_text("\ufeff" + prompts[0] + "\r\n\n   \n" + prompts[1] + "\n" + prompts[2] + "\n", encoding="utf-8")
    out = tmp_path / "sub" / "prompts.parquet"
    assert main_embed_prompts(_args(prompts_file, out, f"local:{tiny_t5}")) == 0
    assert "wrote 3 prompts (1 truncated" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["prompts.parquet"]  # no temp file left

    # Read it back with pyarrow + numpy only.
    pf = pq.ParquetFile(out)
    meta = json.loads(pf.schema_arrow.metadata[b"kiln.t5"])
    assert meta == {"model": f"local:{tiny_t5}", "sha256": embedder.sha256, "d_model": 64, "max_length": MAX_LEN, "dtype": "float16"}
    table = pf.read()
    assert table.schema.names == ["prompt", "prompt_clean", "t5_len", "t5_truncated", "t5"]
    assert [str(t) for t in table.schema.types] == ["string", "string", "int32", "bool", "binary"]
    rows = table.to_pylist()
    assert [r["prompt"] for r in rows] == prompts
    assert [r["prompt_clean"] for r in rows] == [clean_caption(p) for p in prompts]
    assert rows[1]["prompt_clean"] == "café & croissant"
    assert [r["t5_truncated"] for r in rows] == [False, False, True] and rows[2]["t5_len"] == MAX_LEN
    expected = embedder.embed(prompts)
    for row, want in zip(rows, expected):
        array = np.frombuffer(row["t5"], dtype="<f2").reshape(row["t5_len"], meta["d_model"])
        np.testing.assert_array_equal(array, want.array)


def test_embed_prompts_empty_file_is_a_clear_error(tiny_t5, tmp_path, capsys):
    from pipeline.embed_prompts import read_prompts

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\t\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(empty)
    out = tmp_path / "out.parquet"
    from pipeline.cli import main

    assert main(["embed-prompts", str(empty), "-o", str(out), "--t5-model", f"local:{tiny_t5}"]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert not out.exists()
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(binary)


def test_embed_prompts_default_model_matches_embedder():
    from embed.t5 import DEFAULT_MODEL
    from pipeline.embed_prompts import DEFAULT_T5_MODEL

    assert DEFAULT_T5_MODEL == DEFAULT_MODEL


def test_embed_modules_import_no_pipeline_or_train():
    code = (
        "import sys, embed.t5, embed.batching, embed.text; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('pipeline', 'train', 'filters')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
