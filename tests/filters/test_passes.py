"""A sample's scores do not depend on its batch-mates (filters/passes.py), bitwise.

`kiln prepare` batches samples by Beam's bundles and BatchElements' timing, which differ between
runs and runners; DESIGN.md promises byte-identical shards all the same. Each scorer here scores the
same captions and images all at once, one at a time, and in shuffled chunks of uneven sizes, and
every float must be the same bits. The models are the cached tiny ones (`cached_test_models()`).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from filters.clip_similarity import ClipScorer
from filters.nsfw import NsfwScorer
from filters.passes import PASS_ROWS, fill, groups_by_width
from filters.toxicity import ToxicityScorer
from pipeline.testbed.models import cached_test_models

N = 40
WORDS = ("a red blue green grey white black circle square triangle photo illustration of on background "
         "from left to right top bottom and the with").split()


@pytest.fixture(scope="module")
def models():
    return cached_test_models()


@pytest.fixture(scope="module")
def captions():
    rng = random.Random(0)
    # 0 to 40 words: several padded widths, an empty caption among them.
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40))) for _ in range(N)]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (int(rng.integers(40, 300)), int(rng.integers(40, 300)), 3), dtype=np.uint8) for _ in range(N)]


def bundlings(n: int, seed: int = 0):
    """Ways Beam could hand the same n samples to a scorer: all at once, one by one, and three
    shuffles cut into chunks of 1-20."""
    rng = random.Random(seed)
    yield [list(range(n))]
    yield [[i] for i in range(n)]
    for _ in range(3):
        order = list(range(n))
        rng.shuffle(order)
        chunks, i = [], 0
        while i < n:
            k = rng.randint(1, 20)
            chunks.append(order[i : i + k])
            i += k
        yield chunks


def assert_batch_blind(score, n: int):
    """score(indices) -> array with one row per index; the same bits however the indices are cut."""
    reference = None
    for chunks in bundlings(n):
        got = None
        for chunk in chunks:
            part = np.asarray(score(chunk))
            if got is None:
                got = np.empty((n, *part.shape[1:]), dtype=part.dtype)
            got[chunk] = part
        if reference is None:
            reference = got
        else:
            assert got.tobytes() == reference.tobytes(), f"scores changed with the batching {[len(c) for c in chunks]}"


def test_fill_repeats_the_first_row_up_to_the_pass_size():
    x = np.arange(6).reshape(3, 2)
    assert fill(x, 5).tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]]
    assert fill(x, 3) is x
    t = fill(torch.arange(3.0)[:, None], 4)
    assert t.shape == (4, 1) and t[:, 0].tolist() == [0.0, 1.0, 2.0, 0.0]
    with pytest.raises(ValueError):
        fill(x, 2)
    assert groups_by_width([16, 8, 16, 32]) == [(8, [1]), (16, [0, 2]), (32, [3])]
    assert PASS_ROWS >= 16


def test_toxicity_scores_do_not_depend_on_batch_mates(models, captions):
    scorer = ToxicityScorer(f"local:{models['toxicity']}", device="cpu")
    assert_batch_blind(lambda idx: scorer.score([captions[i] for i in idx]).scores, N)


def test_clip_scores_and_embeddings_do_not_depend_on_batch_mates(models, captions, images):
    clip = ClipScorer.from_spec(f"local-dir:{models['clip']}", device="cpu")
    assert_batch_blind(lambda idx: clip.encode_images([images[i] for i in idx]), N)
    assert_batch_blind(lambda idx: clip.encode_texts([captions[i] for i in idx]), N)
    assert_batch_blind(lambda idx: clip.score([images[i] for i in idx], [captions[i] for i in idx]).similarity, N)


def test_nsfw_punsafe_does_not_depend_on_batch_mates(models):
    nsfw = NsfwScorer(models["nsfw"], device="cpu")
    emb = np.random.default_rng(1).standard_normal((N, nsfw.input_dim)).astype(np.float32)
    assert_batch_blind(lambda idx: nsfw.punsafe(emb[idx]), N)
    # A pass size other than the default: still blind to batch-mates at that size.
    small = NsfwScorer(models["nsfw"], device="cpu", batch_size=8)
    assert_batch_blind(lambda idx: small.punsafe(emb[idx]), N)
