"""train/text.py: the trainer's side of the T5 shard contract (numpy + torch only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.text import collate_text, decode_t5_bytes, pad_text_embedding

REPO = Path(__file__).resolve().parents[2]


def embedding(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float16)


def test_decode_round_trip():
    a = embedding(5)
    b = a.astype("<f2").tobytes()
    back = decode_t5_bytes(b, 8)
    assert back.shape == (5, 8) and back.dtype == np.float16
    np.testing.assert_array_equal(back, a)
    # Explicitly big-endian input bytes decode wrong: the format is little-endian, fixed.
    assert decode_t5_bytes(a.astype(">f2").tobytes(), 8).tobytes() != a.astype("<f2").tobytes()


def test_decode_rejects_ragged_bytes():
    with pytest.raises(ValueError, match="whole number"):
        decode_t5_bytes(b"\x00" * 18, 8)
    with pytest.raises(ValueError):
        decode_t5_bytes(b"", 0)
    assert decode_t5_bytes(b"", 8).shape == (0, 8)


def test_pad_shorter():
    a = embedding(3)
    padded, mask = pad_text_embedding(a, 6)
    assert padded.shape == (6, 8) and padded.dtype == np.float16
    np.testing.assert_array_equal(padded[:3], a)
    assert not padded[3:].any()
    assert mask.dtype == bool and mask.tolist() == [True] * 3 + [False] * 3


def test_pad_truncates_longer_and_keeps_dtype():
    a = embedding(10).astype(np.float32)
    padded, mask = pad_text_embedding(a, 4)
    assert padded.dtype == np.float32 and padded.shape == (4, 8)
    np.testing.assert_array_equal(padded, a[:4])
    assert mask.all()
    exact, mask = pad_text_embedding(a, 10)
    np.testing.assert_array_equal(exact, a)
    assert mask.all()


def test_pad_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_tokens, d_model"):
        pad_text_embedding(np.zeros(8, np.float16), 4)
    with pytest.raises(ValueError):
        pad_text_embedding(embedding(2), 0)


def test_collate():
    arrays = [embedding(3, seed=1), embedding(7, seed=2), embedding(1, seed=3)]
    context, mask = collate_text(arrays, max_len=5)
    assert context.shape == (3, 5, 8) and context.dtype == torch.float32
    assert mask.shape == (3, 5) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [3, 5, 1]
    for i, a in enumerate(arrays):
        n = min(len(a), 5)
        np.testing.assert_array_equal(context[i, :n].numpy(), a[:n].astype(np.float32))
        assert not context[i, n:].any()
    # Each row equals pad_text_embedding's answer.
    padded, m = pad_text_embedding(arrays[0], 5)
    np.testing.assert_array_equal(context[0].numpy(), padded.astype(np.float32))
    np.testing.assert_array_equal(mask[0].numpy(), m)


def test_collate_to_longest_and_dtype():
    arrays = [embedding(3), embedding(6)]
    context, mask = collate_text(arrays, max_len=None, dtype=torch.bfloat16)
    assert context.shape == (2, 6, 8) and context.dtype == torch.bfloat16
    assert mask.sum().item() == 9


def test_collate_rejects_mixed_d_model():
    with pytest.raises(ValueError, match="d_model"):
        collate_text([embedding(2, d=8), embedding(2, d=4)], max_len=4)
    with pytest.raises(ValueError):
        collate_text([], max_len=4)


def test_train_text_imports_no_transformers():
    code = (
        "import sys, train.text; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'pipeline', 'filters', 'embed')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
