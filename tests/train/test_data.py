"""train/data.py: shards -> batches (shapes, ranges, masks, skips, crops, low-res twins, splits, order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.train.conftest import (
    SMALL_D_MODEL,
    SMALL_SIZES,
    big_keys,
    corrupt_jpeg,
    keys,
    npy,
    replace_member,
    small_image,
    truncate_in_member,
)
from train.data import (
    CachedSource,
    ImageSpec,
    SkipCounts,
    StreamingSource,
    _resize_center_crop,
    check_dataset,
    holdout_value,
    load_records,
    make_source,
    scan_meta,
    shard_urls,
)


def pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(127.5).sub(1)


def test_shard_urls_follow_the_manifest(small_shards):
    root, _ = small_shards
    urls = shard_urls(root)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["000000.tar", "000001.tar"]


def test_records_shapes_ranges_and_skip_counts(small_shards):
    root, samples = small_shards
    spec = ImageSpec(resolution=32, text_max_len=6, min_stored_size=64)
    counts = SkipCounts()
    records = load_records(root, spec, counts=counts)
    small = SMALL_SIZES[48]
    assert counts.seen == len(samples) and counts.too_small == small and counts.kept == len(samples) - small
    assert [r.key for r in records] == [s["uid"] for s in samples if s["side"] >= 64]  # shard order = uid order
    # The parquet-only scan (what a streaming run reports) agrees with decoding everything.
    assert scan_meta(root, spec).as_dict() == {**counts.as_dict(), "filtered": 0}
    by_uid = {s["uid"]: s for s in samples}
    for r in records:
        assert r.image.dtype == torch.uint8 and tuple(r.image.shape) == (3, 32, 32)
        np.testing.assert_array_equal(r.text, by_uid[r.key]["t5"])
        assert r.caption == by_uid[r.key]["caption"]


def test_batch_shapes_range_and_mask(small_shards):
    root, samples = small_shards
    spec = ImageSpec(resolution=32, text_max_len=6, min_stored_size=64)
    records = load_records(root, spec)
    source = CachedSource(records, spec, batch_size=5, seed=0)
    by_uid = {s["uid"]: s for s in samples}
    for _ in range(3):
        b = source.next()
        assert b["image"].shape == (5, 3, 32, 32) and b["image"].dtype == torch.float32
        assert b["image"].min() >= -1 and b["image"].max() <= 1
        assert b["text"].shape == (5, 6, SMALL_D_MODEL) and b["text"].dtype == torch.float32
        assert b["text_mask"].dtype == torch.bool
        for i, key in enumerate(b["key"]):
            t5 = by_uid[key]["t5"]
            n = min(len(t5), 6)
            assert b["text_mask"][i].tolist() == [True] * n + [False] * (6 - n)
            np.testing.assert_array_equal(b["text"][i, :n].numpy(), t5[:n].astype(np.float32))
            assert not b["text"][i, n:].any()
        assert "lowres" not in b


def test_pixels_are_the_stored_image_resized():
    img = small_image(3, 128)
    out = _resize_center_crop(img, 32)
    expected = img.resize((32, 32), Image.Resampling.BOX)  # area average of 4x4 blocks
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    # Non-square: shorter side to the size, then the centre square.
    wide = Image.new("RGB", (200, 100))
    wide.paste((255, 0, 0), (0, 0, 50, 100))  # the left quarter is cut away by the centre crop
    wide.paste((0, 255, 0), (50, 0, 150, 100))
    out = np.asarray(_resize_center_crop(wide, 50))
    assert out.shape == (50, 50, 3) and (out == [0, 255, 0]).all()


def test_min_stored_size_from_the_config(small_shards):
    """The stage's data.min_stored_size (default: its resolution) decides what is skipped."""
    from train.config import load_config

    root, samples = small_shards
    cfg = load_config("tiny-sr", {"data.resolution": 96, "data.lowres_resolution": 48, "data.text_max_len": 4,
                                  "unet.text_dim": SMALL_D_MODEL, "train.batch_size": 2})
    source = make_source(cfg, root)
    assert isinstance(source, CachedSource)
    assert source.counts.too_small == SMALL_SIZES[48] + SMALL_SIZES[64]
    assert len(source) == SMALL_SIZES[96] + SMALL_SIZES[128]


def test_lowres_is_the_same_image_area_downsampled(small_shards):
    root, _ = small_shards
    spec = ImageSpec(resolution=64, lowres_resolution=16, text_max_len=4, min_stored_size=64)
    source = CachedSource(load_records(root, spec), spec, batch_size=4, seed=1)
    b = source.next()
    assert b["lowres"].shape == (4, 3, 16, 16)
    torch.testing.assert_close(b["lowres"], F.avg_pool2d(b["image"], 4), rtol=0, atol=1e-6)


def test_random_crops_and_their_lowres(small_shards):
    root, samples = small_shards
    spec = ImageSpec(resolution=64, lowres_resolution=16, random_crop=True, crop_size=32, text_max_len=4, min_stored_size=64)
    records = load_records(root, spec)
    by_key = {r.key: r for r in records}
    source = CachedSource(records, spec, batch_size=8, seed=2)
    b = source.next()
    assert b["image"].shape == (8, 3, 32, 32) and b["lowres"].shape == (8, 3, 8, 8)
    offsets = set()
    for i, key in enumerate(b["key"]):
        full = by_key[key].image.float().div(127.5).sub(1)  # [3, 64, 64]
        # Find the crop in the full image: red is a horizontal ramp, green a vertical one.
        found = [(t, l) for t in range(33) for l in range(33) if torch.equal(full[:, t : t + 32, l : l + 32], b["image"][i])]
        assert found, "the crop is not a window of the stage-resolution image"
        offsets.add(found[0])
        torch.testing.assert_close(b["lowres"][i], F.avg_pool2d(b["image"][i][None], 4)[0], rtol=0, atol=1e-6)
    assert len(offsets) > 1  # crops are random, not all centred
    # ... and reproducible: the same seed and step give the same crops.
    again = CachedSource(records, spec, batch_size=8, seed=2).next()
    assert torch.equal(again["image"], b["image"])


def test_holdout_split_is_disjoint_and_stable(small_shards):
    root, samples = small_shards
    spec = ImageSpec(resolution=16, text_max_len=2, min_stored_size=0)
    train = {r.key for r in load_records(root, spec, split="train", holdout_fraction=0.3)}
    held = {r.key for r in load_records(root, spec, split="holdout", holdout_fraction=0.3)}
    assert train and held and not train & held and train | held == {s["uid"] for s in samples}
    assert held == {s["uid"] for s in samples if holdout_value(s["uid"]) < 0.3}
    assert load_records(root, spec, split="holdout", holdout_fraction=0.0) == []


def test_cached_order_is_seeded_infinite_and_resumable(small_shards):
    root, _ = small_shards
    spec = ImageSpec(resolution=16, text_max_len=4, min_stored_size=64)
    records = load_records(root, spec)
    n = len(records)

    def keys(source, k):
        return [source.next()["key"] for _ in range(k)]

    a, b, c = (CachedSource(records, spec, batch_size=4, seed=s) for s in (0, 0, 1))
    run_a = keys(a, 3 * n // 4 + 4)  # more than three epochs
    assert run_a == keys(b, len(run_a))
    assert run_a != keys(c, len(run_a))
    flat = [k for batch in run_a for k in batch]
    for e in range(3):  # every epoch visits every sample exactly once
        assert sorted(flat[e * n : (e + 1) * n]) == sorted(r.key for r in records)
    resumed = CachedSource(records, spec, batch_size=4, seed=0)
    resumed.load_state_dict(a.state_dict() | {"position": 5})
    assert keys(resumed, 3) == run_a[5:8]
    # Two ranks read disjoint halves of each global batch.
    r0 = CachedSource(records, spec, batch_size=2, seed=0, rank=0, world_size=2)
    r1 = CachedSource(records, spec, batch_size=2, seed=0, rank=1, world_size=2)
    single = CachedSource(records, spec, batch_size=4, seed=0)
    for _ in range(4):
        assert r0.next()["key"] + r1.next()["key"] == single.next()["key"]


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_source_is_deterministic_and_resumes(small_shards, workers):
    root, _ = small_shards
    spec = ImageSpec(resolution=16, text_max_len=4, min_stored_size=64)
    n = len(load_records(root, spec))

    def make():
        return StreamingSource(shard_urls(root), spec, batch_size=4, seed=3, num_workers=workers, shuffle_buffer=8)

    a = make()
    run = [a.next()["key"] for _ in range(2 * n // 4)]  # two epochs' worth
    b = make()
    assert run == [b.next()["key"] for _ in range(len(run))]
    flat = [k for batch in run for k in batch]
    assert len(set(flat)) == n  # every kept sample is streamed
    resumed = make()
    resumed.load_state_dict({"kind": "stream", "position": 3, "seed": 3})
    assert [resumed.next()["key"] for _ in range(2)] == run[3:5]


def test_streaming_matches_records_pixels(small_shards):
    root, _ = small_shards
    spec = ImageSpec(resolution=16, lowres_resolution=8, text_max_len=4, min_stored_size=64)
    by_key = {r.key: r for r in load_records(root, spec)}
    b = StreamingSource(shard_urls(root), spec, batch_size=3, seed=0).next()
    for i, key in enumerate(b["key"]):
        torch.testing.assert_close(b["image"][i], by_key[key].image.float().div(127.5).sub(1))
    assert b["lowres"].shape == (3, 3, 8, 8)


def test_keep_filter_and_no_samples_error(small_shards):
    root, _ = small_shards
    spec = ImageSpec(resolution=16, text_max_len=4, min_stored_size=0)
    counts = SkipCounts()
    recs = load_records(root, spec, keep=lambda meta, caption: caption.endswith("96 px"), counts=counts)
    assert len(recs) == SMALL_SIZES[96] and counts.filtered == counts.seen - SMALL_SIZES[96]
    with pytest.raises(ValueError, match="no samples"):
        CachedSource([], spec, batch_size=2)
    with pytest.raises(FileNotFoundError):
        shard_urls(root / "nowhere")


# -- corrupt samples: skipped and counted by reason, never trained on, never a crash ------------------


def broken_copy(small_shards, dest):
    """A copy of the small dataset with one sample of each kind of damage in shard 0, and shard 1
    cut inside its 3rd-from-last sample. Returns (root, {reason: samples})."""
    import shutil

    root, _ = small_shards
    shutil.copytree(root, dest)
    tar0, tar1 = dest / "shards" / "000000.tar", dest / "shards" / "000001.tar"
    k = big_keys(tar0, 6)
    replace_member(tar0, k[0], "png", corrupt_jpeg(), new_ext="jpg")
    replace_member(tar0, k[1], "t5.npy", npy(np.array([None, {"a": 1}], dtype=object), allow_pickle=True))
    replace_member(tar0, k[2], "t5.npy", npy(np.ones((3, SMALL_D_MODEL), np.int64)))
    replace_member(tar0, k[3], "t5.npy", npy(np.ones((3, SMALL_D_MODEL + 1), np.float16)))
    replace_member(tar0, k[4], "json", b"{not json")
    replace_member(tar0, k[5], "t5.npy", b"\x93NUMPY garbage")
    truncate_in_member(tar1, keys(tar1)[-3], "png")
    return dest, {"bad_image": 1, "t5_pickle": 1, "t5_dtype": 1, "wrong_d_model": 1, "bad_meta": 1, "bad_t5": 1,
                  "truncated": 3}


def test_corrupt_samples_are_skipped_and_counted_by_reason(small_shards, tmp_path):
    root, samples = small_shards
    broken, reasons = broken_copy(small_shards, tmp_path / "broken")
    spec = ImageSpec(resolution=16, text_max_len=4, min_stored_size=64, d_model=SMALL_D_MODEL)
    counts = SkipCounts()
    records = load_records(broken, spec, counts=counts)
    corrupt = {k: v for k, v in counts.skipped().items() if k not in ("too_small",)}
    assert corrupt == reasons and counts.corrupt == sum(reasons.values())
    assert counts.seen == len(samples)  # the samples a cut shard lost are counted, not silently gone
    assert len(records) == counts.kept and all(r.text.dtype == np.float16 and r.text.shape[1] == SMALL_D_MODEL
                                               for r in records)
    # The streaming reader (workers in other processes) counts the same, once.
    for workers in (0, 2):
        src = StreamingSource(shard_urls(broken), spec, batch_size=4, seed=0, num_workers=workers,
                              expected={str(broken / "shards" / f"{i:06d}.tar"): n for i, n in enumerate((12, 12))})
        for _ in range(3 * len(records) // 4):  # three epochs
            src.next()
        assert {k: getattr(src.counts, k) for k in reasons} == reasons, workers


def test_a_tar_cut_between_members_is_still_seen_as_truncated(small_shards, tmp_path):
    """tarfile reads a tar cut at a member boundary as a clean, shorter archive: the missing
    end-of-archive blocks give it away, and the sample the cut fell in is not trained on."""
    import shutil

    root, _ = small_shards
    shutil.copytree(root, tmp_path / "d")
    tar = tmp_path / "d" / "shards" / "000000.tar"
    last = keys(tar)[-1]
    truncate_in_member(tar, last, "t5.npy", at_header=True)  # png and json of the last sample survive
    counts = SkipCounts()
    records = load_records(tmp_path / "d", ImageSpec(resolution=16, min_stored_size=0), counts=counts)
    assert counts.truncated == 1 and last not in {r.key for r in records}


def test_check_dataset_refuses_what_cannot_be_trained_on(small_shards, tmp_path):
    import shutil

    from train.errors import DatasetError, UserError

    root, _ = small_shards
    spec = ImageSpec(resolution=16, d_model=SMALL_D_MODEL)
    assert check_dataset(root, spec) == shard_urls(root)
    with pytest.raises(DatasetError, match=f"d_model {SMALL_D_MODEL}, the stage wants unet.text_dim 64"):
        check_dataset(root, ImageSpec(resolution=16, d_model=64))
    with pytest.raises(UserError, match="does not exist"):
        check_dataset(tmp_path / "nowhere", spec)
    shutil.copytree(root, tmp_path / "t5off")
    (tmp_path / "t5off" / "stats.json").write_text('{"stage_modes": {"t5": "off"}}')
    with pytest.raises(DatasetError, match="prepared with --t5 off"):
        check_dataset(tmp_path / "t5off", spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is not a kiln dataset"):
        check_dataset(tmp_path / "empty", spec)
