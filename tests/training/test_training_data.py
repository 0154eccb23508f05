"""Training data: JSONL and caption folders, bad rows skipped and named, short-side resize +
center crop with SDXL micro-conditioning, a data order that depends only on (seed, index)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from instantstyle.training.data import Loader, Order, read_dataset, resize_and_crop, sample_seed
from instantstyle.training.loop import Drops, shard


def test_jsonl_bad_rows_are_skipped_counted_and_named_in_one_line(train_root):
    ds = read_dataset(str(train_root / "data" / "pairs.jsonl"))
    assert len(ds) == 6 and [r.text for r in ds.rows][:2] == ["a picture number 0", "a picture number 1"]
    assert len(ds.bad) == 3
    warning = ds.warning
    assert "\n" not in warning and "skipped 3 bad row(s) of 9" in warning
    assert "line 4: not JSON" in warning and "missing.png" in warning and "broken.png" in warning


def test_caption_folder_and_missing_caption(train_root, tmp_path):
    ds = read_dataset(str(train_root / "folder"))
    assert [r.text for r in ds.rows] == [f"a picture number {i}" for i in range(6)] and ds.warning is None
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    ds = read_dataset(str(tmp_path))
    assert [r.text for r in ds.rows] == ["fine"] and "lonely.png: no caption file 'lonely.txt'" in ds.warning
    with pytest.raises(ValueError, match="no such file or folder"):
        read_dataset(str(tmp_path / "nothing"))


def test_resize_center_crop_and_micro_conditioning(train_root):
    image = Image.new("RGB", (80, 40))  # w 80, h 40: short side 40 -> 32, width 64, crop 16 px from the left
    cropped, original, crop = resize_and_crop(image, 32)
    assert cropped.size == (32, 32) and original == (40, 80) and crop == (0, 16)
    sample = Loader(read_dataset(str(train_root / "folder")), 32, seed=0)(0)
    assert sample.pixels.shape == (3, 32, 32) and -1 <= sample.pixels.min() and sample.pixels.max() <= 1
    h, w = Image.open(sample.row.image).size[::-1]
    assert sample.time_ids[:2].tolist() == [h, w] and sample.time_ids[4:].tolist() == [32, 32]


def test_order_and_sharding_depend_only_on_the_global_index():
    order = Order(5, seed=3)
    epoch0 = [order.row(i) for i in range(5)]
    assert sorted(epoch0) == list(range(5)) and [Order(5, 3).row(i) for i in (7, 2, 9)] == [order.row(i) for i in (7, 2, 9)]
    assert [order.row(i) for i in range(5, 10)] != epoch0  # a new permutation per epoch (for this seed)
    assert sample_seed(0, 1) != sample_seed(0, 2) and sample_seed(0, 1) == sample_seed(0, 1)
    # a step's samples are the same set for any number of processes and micro-batches
    one = list(shard(3, 0, 8, 1, 0, 1))
    split = [g for micro in range(2) for rank in range(2) for g in shard(3, micro, 8, 2, rank, 2)]
    assert one == split == list(range(24, 32))
    drops = Drops(0.05, 0.05, 0.05)
    assert [drops.decide(u) for u in (0.01, 0.07, 0.12, 0.5)] == [(True, False), (False, True), (True, True), (False, False)]
    with pytest.raises(ValueError, match="must be <= 1"):
        Drops(0.5, 0.5, 0.5).check()
    assert torch.equal(torch.tensor(epoch0), torch.tensor([Order(5, 3).row(i) for i in range(5)]))
