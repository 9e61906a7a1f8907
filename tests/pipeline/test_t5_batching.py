"""EmbedT5's Beam batches sized by caption tokens (--t5-batch-tokens): the sizing, and that a
caption's stored bytes do not depend on which Beam batch (or batch-mates) it had."""

from __future__ import annotations

import random

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from embed.t5 import CaptionTokens, T5Embedder
from pipeline.config import ConfigError, InputConfig, ModelsConfig, T5Config
from pipeline.model_stages import CaptionTokenCount, EmbedT5, t5_batch_tokens
from pipeline.testbed.models.t5 import build_tiny_t5, prompt_like_text

MAX_LEN = 32


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5") / "model", seed=0)


def captions(n: int = 60) -> list[str]:
    rng = random.Random(5)
    base = prompt_like_text(rng, n - 4)
    return base + ["", "a", ", ".join(prompt_like_text(rng, 6)), "x " * 100]  # empty, 2 tokens, truncated ones


def test_batch_tokens_by_device():
    cpu, gpu = ModelsConfig(device="cpu"), ModelsConfig(device="cuda:1")
    assert t5_batch_tokens(T5Config(), cpu) is None  # CPU: batches of 256 captions, as before
    assert t5_batch_tokens(T5Config(), gpu) == 4 * 16384
    assert t5_batch_tokens(T5Config(max_tokens=8192), gpu) == 4 * 8192
    assert t5_batch_tokens(T5Config(), ModelsConfig(device="cpu", gpu_resource_hint="type:nvidia-l4;count:1")) == 65536
    assert t5_batch_tokens(T5Config(batch_tokens=0), gpu) is None
    assert t5_batch_tokens(T5Config(batch_tokens=5000), cpu) == 5000
    with pytest.raises(ConfigError, match="--t5-batch-tokens 100 is below --t5-max-length 128"):
        t5_batch_tokens(T5Config(batch_tokens=100), cpu)


def test_caption_tokens_count_what_the_encoder_encodes(tiny_t5):
    emb = T5Embedder(f"local:{tiny_t5}", device="cpu", max_length=MAX_LEN)
    count = CaptionTokens(f"local:{tiny_t5}", max_length=MAX_LEN)
    texts = captions()
    assert [count(c) for c in texts] == emb.tokenize_lengths(texts)
    assert count("") == 1 and count("x " * 100) == MAX_LEN
    size = CaptionTokenCount(T5Config(model=f"local:{tiny_t5}", max_length=MAX_LEN), "caption")
    assert size({"caption": texts[0]}) == count(texts[0]) and size({"caption": None}) == 1


def test_beam_batches_hold_at_most_the_token_budget(tiny_t5):
    cfg = T5Config(model=f"local:{tiny_t5}", max_length=MAX_LEN)
    size = CaptionTokenCount(cfg)
    records = [{"uid": str(i), "TEXT": c} for i, c in enumerate(captions())]
    total = sum(size(r) for r in records)
    budget = 96
    with beam.Pipeline() as p:
        sizes = (p | beam.Create(records, reshuffle=False)
                 | beam.BatchElements(min_batch_size=budget, max_batch_size=budget, element_size_fn=size)
                 | beam.Map(lambda batch: sum(size(r) for r in batch)))
        assert_that(sizes | "Total" >> beam.CombineGlobally(sum), equal_to([total]), label="Total")
        assert_that(sizes | "Over" >> beam.Filter(lambda s: s > budget) | beam.combiners.Count.Globally(),
                    equal_to([0]), label="NoneOver")


def test_token_sized_batches_store_the_same_bytes(tiny_t5):
    """The stage with Beam batches of 64 tokens, of 256 captions (--t5-batch-tokens 0) and each
    caption encoded alone give byte-identical embeddings: padding is masked, and each caption's
    padded width is a function of its own length (embed.batching), whatever its batch-mates."""
    texts = captions()
    records = [{"uid": str(i), "TEXT": c, "URL": f"http://x/{i}"} for i, c in enumerate(texts)]
    model = f"local:{tiny_t5}"
    emb = T5Embedder(model, device="cpu", max_length=MAX_LEN)
    alone = [emb.embed([c])[0] for c in texts]
    assert any(r.truncated for r in alone) and len({r.n_tokens for r in alone}) > 8
    want = [(str(i), r.array.tobytes(), r.n_tokens, r.truncated) for i, r in enumerate(alone)]
    for batch_tokens in (64, 0):  # token-sized Beam batches; batches of 256 captions
        cfg = T5Config(model=model, max_length=MAX_LEN, batch_tokens=batch_tokens)
        with beam.Pipeline() as p:
            res = p | beam.Create(records) | EmbedT5(cfg, ModelsConfig(device="cpu"), InputConfig())
            got = res["main"] | beam.Map(lambda r: (r["uid"], r["_t5"].tobytes(), r["t5_len"], r["t5_truncated"]))
            assert_that(got, equal_to(want))
            assert_that(res["rejects"], equal_to([]), label="NoRejects")
