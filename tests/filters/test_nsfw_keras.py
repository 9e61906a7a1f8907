"""filters.nsfw_keras: LAION's autokeras NSFW SavedModels -> keras_dense safetensors -> NsfwScorer.

The files are built here by `write_keras_nsfw` (same files, variable names, layer structure and
object-graph paths as LAION's clip_autokeras_nsfw_b32 / clip_autokeras_binary_nsfw), with random
weights; no TensorFlow is needed. The scorer is checked against an independent numpy version of the
Keras forward pass: MultiCategoryEncoding (StringLookup of printf "%f") -> Normalization -> Dense/ReLU
-> Dense -> sigmoid."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from filters.errors import ModelLoadError
from filters.nsfw import KERAS_LAYOUT, NsfwScorer
from filters.nsfw_keras import (KerasNsfwFormatError, convert, main, read_keras_nsfw, read_tensor_bundle,
                                write_keras_nsfw)

REPO = Path(__file__).resolve().parents[2]
B32_COLS = (92, 133, 312)  # the categorical columns of LAION's B/32 model


def _vocab(rng, center, n):
    """n distinct "%f" tokens of float16 values around `center` (as autokeras saw them), in index order."""
    vals = np.unique((center + rng.standard_normal(4 * n) * 0.02).astype(np.float16))
    return ["%f" % float(v) for v in rng.permutation(vals)[:n]]


def _b32_like(path, seed=0, **kw):
    rng = np.random.default_rng(100 + seed)
    cat = {c: _vocab(rng, center, 40) for c, center in zip(B32_COLS, (0.5, -0.3, 0.25))}
    return write_keras_nsfw(path, 512, (32, 32), dropout_after=1, categorical=cat, seed=seed, **kw), cat


@pytest.fixture(scope="module")
def b32(tmp_path_factory):
    return _b32_like(tmp_path_factory.mktemp("b32") / "clip_autokeras_nsfw_b32.zip")


def _embeddings(cat, n, seed=0, hit_rows=0.5):
    """Unit-norm float16 embeddings whose categorical columns hold vocabulary values (or not) in some rows.

    Values are float16 and the vector is unit-norm to ~1e-5, so the scorer's float32 re-normalisation
    and float16 rounding give the same values back (asserted)."""
    rng = np.random.default_rng(seed)
    d = 512
    cols = sorted(cat)
    x = np.zeros((n, d))
    for j, c in enumerate(cols):
        toks = np.array([float(t) for t in cat[c]])
        hit = rng.random(n) < hit_rows
        x[:, c] = np.where(hit, toks[rng.integers(0, len(toks), n)], rng.uniform(-0.6, 0.6, n))
    rest = np.setdiff1d(np.arange(d), cols)
    r = rng.standard_normal((n, rest.size))
    budget = 1.0 - (x[:, cols] ** 2).sum(1, keepdims=True)
    x[:, rest] = r / np.linalg.norm(r, axis=1, keepdims=True) * np.sqrt(budget)
    x16 = x.astype(np.float16)
    x32 = x16.astype(np.float32)
    again = (x32 / np.linalg.norm(x32, axis=1, keepdims=True)).astype(np.float16)
    assert np.array_equal(again, x16)  # re-normalising + float16 rounding is the identity on these
    return x16


def keras_forward_numpy(x16, layers):
    """Independent numpy Keras forward pass on the model's float64 input (float16 values)."""
    x = np.asarray(x16, dtype=np.float64)
    h = x.astype(np.float32)
    lookup = next((L for L in layers if L["kind"] == "lookup"), None)
    for col, (tokens, indices) in (lookup["columns"].items() if lookup else []):
        index = dict(zip(tokens, indices))
        h[:, col] = [index.get("%f" % v, 0) for v in x[:, col]]  # tf.strings.as_string -> StringLookup
    norm = next(L for L in layers if L["kind"] == "normalization")
    h = (h - norm["mean"]) / np.maximum(np.sqrt(norm["variance"]), np.float32(1e-7))
    dense = [L for L in layers if L["kind"] == "dense"]
    for i, L in enumerate(dense):
        h = h.astype(np.float64) @ L["kernel"].astype(np.float64) + L["bias"]
        if i < len(dense) - 1:
            h = np.maximum(h, 0)
    return (1 / (1 + np.exp(-h[:, 0]))).astype(np.float32)


def test_reads_laion_layout(b32):
    path, cat = b32
    layers, meta = read_keras_nsfw(path)
    assert [L["kind"] for L in layers] == ["lookup", "normalization", "dense", "dense", "dense"]
    assert [L["kernel"].shape for L in layers if L["kind"] == "dense"] == [(512, 32), (32, 32), (32, 1)]
    assert [L["activation"] for L in layers if L["kind"] == "dense"] == ["relu", "relu", "sigmoid"]
    lookup = layers[0]["columns"]
    assert sorted(lookup) == list(B32_COLS)
    for c in B32_COLS:
        assert lookup[c][0] == cat[c] and list(lookup[c][1]) == list(range(1, 41))
    assert meta["input_dim"] == 512 and meta["keras_version"] == "2.8.0" and meta["source_file"] == path.name

    # the zip holds LAION's files and variable names
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
    base = "clip_autokeras_nsfw_b32/"
    assert {base + n for n in ("keras_metadata.pb", "saved_model.pb", "variables/variables.index",
                               "variables/variables.data-00000-of-00001")} <= names
    with zipfile.ZipFile(path) as z:  # the unzipped folder reads the same
        z.extractall(path.parent / "x")
    layers2, _ = read_keras_nsfw(path.parent / "x" / "clip_autokeras_nsfw_b32")
    np.testing.assert_array_equal(layers2[1]["mean"], layers[1]["mean"])
    ckpt = read_tensor_bundle(path.parent / "x" / "clip_autokeras_nsfw_b32" / "variables" / "variables")
    assert ckpt["layer_with_weights-2/kernel/.ATTRIBUTES/VARIABLE_VALUE"].shape == (512, 32)
    assert ckpt["layer_with_weights-1/count/.ATTRIBUTES/VARIABLE_VALUE"] == 242067
    assert ckpt["layer_with_weights-0/encoding_layers/92/token_counts/.ATTRIBUTES/table-keys"].shape == (0,)


def test_scorer_matches_numpy_keras_forward(b32, tmp_path):
    path, cat = b32
    out = convert(path, tmp_path / "b32.safetensors")
    with safe_open(str(out), "np") as f:
        md = f.metadata()
        keys = set(f.keys())
    assert md["layout"] == KERAS_LAYOUT and md["activation"] == "sigmoid" and md["input_precision"] == "float16"
    assert {"norm.mean", "norm.variance", "lookup.columns"} <= keys
    assert {f"dense.{i}.{p}" for i in range(3) for p in ("weight", "bias")} <= keys

    s = NsfwScorer(out, device="cpu")
    assert s.layout == KERAS_LAYOUT and s.input_dim == 512 and s.source["layout"] == KERAS_LAYOUT
    layers, _ = read_keras_nsfw(path)
    x16 = _embeddings(cat, 400, seed=1)
    got = s.punsafe(x16)
    want = keras_forward_numpy(x16, layers)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert 0.02 < want.std()  # not a constant output
    # the lookups matter: with every categorical column missing the vocabulary, scores change
    assert np.abs(want - keras_forward_numpy(x16, [L for L in layers if L["kind"] != "lookup"])).max() > 1e-3
    # float32 input and another scale give the same scores (re-normalised, then rounded to float16)
    np.testing.assert_allclose(s.punsafe(x16.astype(np.float32) * 2.0), got, atol=1e-6)
    np.testing.assert_allclose(NsfwScorer(out, device="cpu", batch_size=7).punsafe(x16[:50]), got[:50], atol=1e-6)


def test_l14_shape_and_token_counts(tmp_path):
    """L/14's stack (768 -> 64 -> 512 -> 256 -> 1, no dropout) and a vocabulary kept in token_counts."""
    rng = np.random.default_rng(5)
    cat = {180: _vocab(rng, 0.4, 30), 644: _vocab(rng, -0.2, 25)}
    path = write_keras_nsfw(tmp_path / "clip_autokeras_binary_nsfw.zip", 768, (64, 512, 256), categorical=cat,
                            seed=3, token_counts=True)
    layers, meta = read_keras_nsfw(path)
    assert [L["kernel"].shape for L in layers if L["kind"] == "dense"] == [(768, 64), (64, 512), (512, 256), (256, 1)]
    # Keras 2.8 rebuilds the vocabulary from token_counts: count descending (the builder's order here)
    assert {c: layers[0]["columns"][c][0] for c in cat} == cat
    s = NsfwScorer(convert(path, tmp_path / "l14.safetensors"), device="cpu")
    assert s.input_dim == 768
    with pytest.raises(ModelLoadError) as e:
        s.check_compatible(512, "ViT-B-32:openai")
    assert "768-d" in str(e.value) and "512-d" in str(e.value) and str(e.value).startswith("--nsfw-head ")
    s.check_compatible(768)
    with pytest.raises(ModelLoadError, match="768"):
        NsfwScorer(tmp_path / "l14.safetensors", input_dim=512)
    x = np.random.default_rng(0).standard_normal((20, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x16 = x.astype(np.float16)
    # these rows are not float16-stable under re-normalisation; allow a float16 ulp's effect
    np.testing.assert_allclose(s.punsafe(x16), keras_forward_numpy(x16, layers), atol=1e-3)


@pytest.mark.parametrize("damage", ["garbage", "truncated_zip", "truncated_index", "flipped_data", "not_laion"])
def test_bad_input_is_one_line_error(b32, tmp_path, damage):
    path, _ = b32
    bad = tmp_path / "bad.zip"
    if damage == "garbage":
        bad.write_bytes(os.urandom(5000))
    elif damage == "truncated_zip":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        with zipfile.ZipFile(path) as z:
            z.extractall(tmp_path / "x")
        bad = tmp_path / "x" / "clip_autokeras_nsfw_b32"
        idx, data = bad / "variables" / "variables.index", bad / "variables" / "variables.data-00000-of-00001"
        if damage == "truncated_index":
            idx.write_bytes(idx.read_bytes()[:-20])
        elif damage == "flipped_data":
            b = bytearray(data.read_bytes())
            b[100] ^= 0xFF
            data.write_bytes(bytes(b))
        else:  # a SavedModel of another kind: no keras metadata
            (bad / "keras_metadata.pb").unlink()
    with pytest.raises(KerasNsfwFormatError) as e:
        read_keras_nsfw(bad)
    msg = str(e.value)
    assert isinstance(e.value, ModelLoadError) and isinstance(e.value, ValueError)
    assert "\n" not in msg and msg.startswith(f"--nsfw-head {bad}:") and "clip_autokeras" in msg
    assert main([str(bad), str(tmp_path / "o.safetensors")]) == 2
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_missing_input_exists_force_atomic(b32, tmp_path, capsys, monkeypatch):
    path, _ = b32
    out = tmp_path / "head.safetensors"
    assert main([str(tmp_path / "missing.zip"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "missing.zip" in err
    assert not out.exists()

    assert main([str(path), str(out)]) == 0
    from safetensors.numpy import load_file

    first = load_file(str(out))
    out.write_bytes(b"keep me")
    capsys.readouterr()
    assert main([str(path), str(out)]) == 2  # never overwritten without --force
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err and out.read_bytes() == b"keep me"
    assert main([str(path), str(out), "--force"]) == 0
    again = load_file(str(out))  # the same tensors again
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)

    # atomic: a failure while writing leaves neither OUT nor a temporary file behind
    import safetensors.numpy

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    out2 = tmp_path / "sub" / "h2.safetensors"
    assert main([str(path), str(out2)]) == 2
    assert "No space left" in capsys.readouterr().err
    assert not out2.exists() and os.listdir(out2.parent) == []


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "filters.nsfw_keras", str(tmp_path / "nope.zip"),
                        str(tmp_path / "o.safetensors")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nope.zip" in r.stderr


def test_scorer_rejects_broken_keras_dense(b32, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = b32
    good = convert(path, tmp_path / "good.safetensors")
    with safe_open(str(good), "np") as f:
        md = f.metadata()
    t = load_file(str(good))
    t["dense.1.weight"] = t["dense.1.weight"][:, :16]
    save_file(t, str(tmp_path / "chain.safetensors"), metadata=md)
    with pytest.raises(ModelLoadError, match="keras_dense.*dense.1"):
        NsfwScorer(tmp_path / "chain.safetensors")
    t = load_file(str(good))
    del t["norm.variance"]
    save_file(t, str(tmp_path / "nonorm.safetensors"), metadata=md)
    with pytest.raises(ModelLoadError, match="norm"):
        NsfwScorer(tmp_path / "nonorm.safetensors")
    save_file(load_file(str(good)), str(tmp_path / "layout.safetensors"), metadata={**md, "layout": "other"})
    with pytest.raises(ModelLoadError, match="layout 'other'"):
        NsfwScorer(tmp_path / "layout.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:500])
    with pytest.raises(ModelLoadError, match="truncated"):
        NsfwScorer(tmp_path / "trunc.safetensors")
