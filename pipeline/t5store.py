"""How a T5 embedding is stored: `--t5-dtype` (the number format) and `--t5-store` (where).

The encoder hands over float16 `[t5_len, d_model]` (embed.t5; a value outside float16's range is
already a `t5/t5_fp16_overflow` reject). What lands on disk (SHARDS.md):

    --t5-dtype  tar member    bytes per value  t5_dtype        t5_scale
    float16     KEY.t5.npy    2                float16         1.0   (.npy, as before issue 14)
    bfloat16    KEY.t5.bf16   2                bfloat16        1.0   (raw little-endian, row-major)
    float8      KEY.t5.f8     1                float8_e4m3fn   s     (raw; value = stored x s)

`t5_dtype` and `t5_scale` are meta columns and KEY.json keys, so a raw member is read with
`t5_len` rows and `nbytes / (t5_len x bytes per value)` columns. The meta parquet's `t5` column
(with `--t5-store meta|both`) holds the same raw values (float16: the array's bytes, not the .npy).

float8 (e4m3fn: 4 exponent bits, 3 mantissa bits, finite max 448, no inf) keeps ~2 significant
digits. Its range is the problem: T5 activations are not bounded by 448 (the tiny test T5's are
< 1; T5-XXL's final layer norm output was not measured here). So every sample is scaled:
s = max|x| / 448 (float32; 1.0 for an all-zero array), stored = e4m3fn(x / s), rounded to nearest
even. Nothing is clipped: x / s is within +-448 by construction, and an encoding whose result
is not finite raises instead of storing it.
"""

from __future__ import annotations

import io

import numpy as np

T5_DTYPES = ("float16", "bfloat16", "float8")  # --t5-dtype
T5_STORES = ("tar", "meta", "both")  # --t5-store
# --t5-dtype -> (tar member extension, the t5_dtype value written, bytes per value)
FORMATS = {
    "float16": ("t5.npy", "float16", 2),
    "bfloat16": ("t5.bf16", "bfloat16", 2),
    "float8": ("t5.f8", "float8_e4m3fn", 1),
}
E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype="<f2"), allow_pickle=False)
    return buf.getvalue()


def bfloat16_bytes(x: np.ndarray) -> bytes:
    """Little-endian bfloat16 of finite float32 values, rounded to nearest even (as torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def float8_bytes(x: np.ndarray) -> tuple[bytes, float]:
    """(float8_e4m3fn bytes of x / s, s) with s = max|x| / 448 (module docstring)."""
    import torch

    x = np.asarray(x, dtype=np.float32)
    peak = float(np.abs(x).max()) if x.size else 0.0
    scale = np.float32(peak / E4M3_MAX) if peak > 0 else np.float32(1.0)
    if not np.isfinite(scale) or scale == 0:  # subnormal peak: a scale that would not divide back
        scale = np.float32(1.0)
    q = torch.from_numpy(np.ascontiguousarray(x / scale)).to(torch.float8_e4m3fn)
    if not bool(torch.isfinite(q.float()).all()):
        raise ValueError(f"float8 encoding of a T5 array (max |x| {peak:.4g}, scale {float(scale):.4g}) is not finite")
    return q.view(torch.uint8).numpy().tobytes(), float(scale)


def encode_t5(array: np.ndarray, dtype: str) -> tuple[str, bytes, bytes, str, float]:
    """(tar member extension, tar member bytes, meta `t5` bytes, t5_dtype, t5_scale) for a float16
    `[t5_len, d_model]` array stored as `dtype` (one of T5_DTYPES)."""
    ext, name, _ = FORMATS[dtype]
    a = np.ascontiguousarray(array)
    if not np.isfinite(a).all():
        raise ValueError("a T5 array with inf or NaN cannot be stored")
    if dtype == "float16":
        raw = a.astype("<f2").tobytes()
        return ext, _npy(a), raw, name, 1.0
    if dtype == "bfloat16":
        raw = bfloat16_bytes(a)
        return ext, raw, raw, name, 1.0
    raw, scale = float8_bytes(a)
    return ext, raw, raw, name, scale
