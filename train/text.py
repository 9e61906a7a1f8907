"""T5 text embeddings as the trainer reads them: decode, pad/truncate, mask, collate.

Shards store each caption's T5 encoding unpadded: `[n_tokens, d_model]` float16, EOS included,
little-endian row-major bytes in parquet (`t5` columns) or an .npy member (SHARDS.md). The U-Nets'
cross-attention wants a fixed-length `[B, max_len, d_model]` tensor plus a mask, so padding happens
here, per batch, where it costs nothing on disk:

    arrays = [decode_t5_bytes(row["t5"], d_model) for row in rows]
    context, mask = collate_text(arrays, max_len=128)   # [B, 128, d] float32, [B, 128] bool

`mask` is True on real tokens. Arrays longer than `max_len` are cut to their first `max_len` rows
(shards are already capped at the encoder's max_length, so this only bites when training with a
shorter context than was encoded; the EOS row is then lost -- re-encode with a smaller
`--t5-max-length` to keep it).

Only numpy and torch: the trainer never imports transformers (DESIGN.md), which a test checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["collate_text", "decode_t5_bytes", "pad_text_embedding"]


def decode_t5_bytes(b: bytes, d_model: int) -> np.ndarray:
    """float16 `[n_tokens, d_model]` from a stored `t5` value (little-endian float16, row-major).

    The result is a read-only view of `b` where the machine is little-endian (copy it to write)."""
    if d_model < 1:
        raise ValueError(f"d_model must be >= 1, got {d_model}")
    row_bytes = 2 * d_model
    if len(b) % row_bytes:
        raise ValueError(f"{len(b)} bytes is not a whole number of float16 rows of d_model={d_model} ({row_bytes} bytes each)")
    a = np.frombuffer(b, dtype="<f2").reshape(-1, d_model)
    return a.astype(np.float16, copy=False)  # native byte order (a no-op on little-endian machines)


def _check_2d(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"a text embedding must be [n_tokens, d_model], got shape {array.shape}")
    return array


def pad_text_embedding(array: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(`[max_len, d_model]` array in the input's dtype, zero rows after the real ones; bool mask
    `[max_len]`, True on real tokens). Longer inputs keep their first `max_len` rows."""
    array = _check_2d(array)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    n = min(array.shape[0], max_len)
    padded = np.zeros((max_len, array.shape[1]), dtype=array.dtype)
    padded[:n] = array[:n]
    mask = np.zeros(max_len, dtype=bool)
    mask[:n] = True
    return padded, mask


def collate_text(
    arrays: Sequence[np.ndarray], max_len: int | None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[B, max_len, d_model]` tensor of `dtype`, bool mask `[B, max_len]`) for a batch.

    `max_len=None` pads to the batch's longest array. Every array must have the same d_model."""
    if not arrays:
        raise ValueError("collate_text needs at least one array")
    arrays = [_check_2d(a) for a in arrays]
    d_models = {a.shape[1] for a in arrays}
    if len(d_models) != 1:
        raise ValueError(f"arrays disagree on d_model: {sorted(d_models)}")
    (d_model,) = d_models
    if max_len is None:
        max_len = max(1, max(a.shape[0] for a in arrays))
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = np.zeros((len(arrays), max_len, d_model), dtype=np.float32)
    mask = np.zeros((len(arrays), max_len), dtype=bool)
    for i, a in enumerate(arrays):
        n = min(a.shape[0], max_len)
        out[i, :n] = a[:n]  # float16 -> float32 is exact
        mask[i, :n] = True
    return torch.from_numpy(out).to(dtype), torch.from_numpy(mask)
