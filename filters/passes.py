"""Forward passes whose results do not depend on a sample's batch-mates.

DESIGN.md promises byte-identical shards from two runs over the same input and models, and in
`kiln prepare` which samples share a model's batch depends on Beam's bundles (and on BatchElements'
timing), which differ between runs and between runners. A float32 forward pass is not batch-blind:
two things change a row's result with the pass it is in (embed/t5.py measures both for T5):

  * the padded width of a text: softmax and attention reductions run over every key, masked ones
    included, in an order that follows the width. So a text is padded to
    `embed.batching.pad_width(its own length)` and a pass never mixes widths;
  * the number of rows in the pass: the BLAS splits a matrix product across threads and into
    register tiles by its shape, and rows in a remainder tile are summed differently. Measured here
    (MKL, 2 threads) on the tiny NSFW head: 108 of the row counts 1-512 give some row another
    result than the same row in a pass of 512; at one fixed row count, neither the row's position
    nor its batch-mates change it (20 permutations and replaced batch-mates, bitwise). So every
    pass has exactly a fixed number of rows (PASS_ROWS for the text and image passes, the NSFW
    head's batch size for its passes), a short one filled with copies of its first row that are
    computed and dropped (`fill`). The filler rows are dropped only after the last elementwise op (sigmoid,
    normalisation): a vectorised op treats the tail that does not fill its SIMD lanes differently
    (the NSFW head's sigmoid over 17 values rounded the 17th unlike over 64).

So a sample's scores are a function of the sample, the model and the pass size alone. Measured
without this (tests/pipeline/test_portable_runner.py's job): two DirectRunner runs differed by up
to 1.7e-6 relative in punsafe, 5e-7 in toxicity and 2e-7 in clip_similarity.

This rests on the kernels' behaviour, not on IEEE arithmetic: tests/filters/test_passes.py checks it
bitwise on the machine it runs on (CPU). Another BLAS, CPU or thread count may round differently
(between machines, bytes can differ anyway); on CUDA a fixed shape likewise fixes cuBLAS's kernel
choice, which is not verified here (no GPU).
"""

from __future__ import annotations

import numpy as np

# Rows per pass of the text and image models. Small, so that filling wastes little: at most
# PASS_ROWS - 1 filler rows per call (per padded width for text); Beam's adaptive batches start at
# one element per bundle. A GPU would be busier with larger passes (a fixed size all the same).
PASS_ROWS = 16


def fill(x, rows: int):
    """`x` ([n, ...] torch tensor or numpy array, 1 <= n <= rows) with copies of its first row
    appended up to exactly `rows` rows. Callers keep the first n rows of the result."""
    n = x.shape[0]
    if not 1 <= n <= rows:
        raise ValueError(f"a pass of {rows} rows cannot hold {n}")
    if n == rows:
        return x
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.repeat(x[:1], rows - n, axis=0)])
    import torch

    return torch.cat([x, x[:1].expand(rows - n, *x.shape[1:])])


def groups_by_width(widths) -> list[tuple[int, list[int]]]:
    """[(width, indices)] for each distinct width, widths ascending, indices in input order."""
    out: dict[int, list[int]] = {}
    for i, w in enumerate(widths):
        out.setdefault(int(w), []).append(i)
    return sorted(out.items())
