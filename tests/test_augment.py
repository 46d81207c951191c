import pytest
import torch
import torch.nn.functional as F

from fastcifar.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BatchAugment,
    alternating_mirror,
    crop_flip_cutout,
    cutout,
    cutout_squares,
    normalize,
    random_crop,
    random_flip,
    random_window,
    scale_down,
)
from fastcifar.config import DataConfig


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 16, channels_last: bool = True, seed: int = 0) -> torch.Tensor:
    x = torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_crop_is_a_window_of_the_padded_image(pad_mode, channels_last):
    x = batch(channels_last=channels_last)
    out = random_crop(x, 4, gen(), pad_mode)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="constant" if pad_mode == "zeros" else "reflect")
    offsets = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(9) for dx in range(9)
                   if torch.equal(padded[i, :, dy:dy + 32, dx:dx + 32], out[i].float())]
        assert matches, f"image {i} is not a window of its padded input"
        offsets.add(matches[0])
    assert len(offsets) > 1  # each image draws its own offset


def test_crop_without_padding_is_identity():
    x = batch()
    assert torch.equal(random_crop(x, 0, gen()), x)


@pytest.mark.parametrize("channels_last", [True, False])
def test_flip_p1_mirrors_and_p0_is_identity(channels_last):
    x = batch(channels_last=channels_last)
    assert torch.equal(random_flip(x, gen(), p=1.0), x.flip(-1))
    assert torch.equal(random_flip(x, gen(), p=0.0), x)


def test_flip_half_flips_some_images_and_not_others():
    x = batch(64)
    out = random_flip(x, gen(), p=0.5)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 10 < sum(flipped) < 54


@pytest.mark.parametrize("size", [8, 5])
def test_cutout_fills_exactly_one_clipped_square_per_image(size):
    x = torch.full((200, 3, 32, 32), 255, dtype=torch.uint8)
    out = cutout(x, size, gen(), torch.tensor([0, 0, 0], dtype=torch.uint8))
    clipped = 0
    for img in out:
        mask = (img == 0).all(dim=0)
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        assert len(rows) and len(cols)
        # the filled pixels form one solid rectangle of at most size x size
        block = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert block.all() and mask.sum() == block.numel()
        assert len(rows) <= size and len(cols) <= size
        # a rectangle smaller than the square only where it touches the border
        assert len(rows) == size or rows.min() == 0 or rows.max() == 31
        assert len(cols) == size or cols.min() == 0 or cols.max() == 31
        clipped += mask.sum() < size * size
        assert ((img == 255).all(dim=0) | mask).all()  # nothing else changed
    assert 0 < clipped < 200


def test_cutout_fill_value_is_per_channel():
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    out = cutout(x, 8, gen(), torch.tensor([10, 20, 30], dtype=torch.uint8))
    for c, value in enumerate([10, 20, 30]):
        assert set(out[:, c].unique().tolist()) == {0, value}


def test_normalize_matches_the_formula_and_keeps_dtype():
    x = batch()
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    out = normalize(x, mean, std, torch.bfloat16)
    expected = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_augment_is_reproducible_and_channels_last(dtype):
    x = batch(32)
    settings = DataConfig(crop_padding=4, pad_mode="zeros", flip=True, flip_mode="random", cutout_size=8)
    a = BatchAugment(settings, torch.device("cpu"), seed=3, dtype=dtype).train(x)
    b = BatchAugment(settings, torch.device("cpu"), seed=3, dtype=dtype).train(x)
    c = BatchAugment(settings, torch.device("cpu"), seed=4, dtype=dtype).train(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == dtype and a.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(a.float()).all()


def test_cutout_fill_normalises_to_about_zero():
    aug = BatchAugment(DataConfig(), torch.device("cpu"), 0, torch.float32)
    filled = aug.normalize(aug.fill.view(1, 3, 1, 1).expand(1, 3, 32, 32))
    assert filled.abs().max() < 0.5 / 255 / min(CIFAR10_STD)  # within uint8 rounding of zero


@pytest.mark.parametrize(("padding", "pad_mode", "flip", "size"), [
    (4, "zeros", True, 8), (4, "reflect", True, 8), (4, "zeros", False, 0), (0, "zeros", True, 5), (2, "reflect",
                                                                                                       False, 3)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_path_equals_the_separate_functions(padding, pad_mode, flip, size, channels_last):
    x = batch(64)
    if not channels_last:
        x = x.contiguous()
    fill = torch.tensor([125, 123, 114], dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    expected = random_crop(x, padding, g1, pad_mode)
    if flip:
        expected = random_flip(expected, g1)
    expected = cutout(expected, size, g1, fill)
    assert torch.equal(crop_flip_cutout(x, padding, pad_mode, flip, size, g2, fill), expected)


def test_alternating_mirror_flips_each_image_in_every_other_epoch_in_any_order():
    x = batch(256)
    m0, m1, m2 = (alternating_mirror(x, e) for e in range(3))
    assert torch.equal(m0, ~m1) and torch.equal(m0, m2)
    assert 80 < int(m0.sum()) < 176  # about half the images in each epoch
    order = torch.randperm(256, generator=gen(1))
    assert torch.equal(alternating_mirror(x[order], 0), m0[order])  # a property of the image, not its position
    assert torch.equal(alternating_mirror(x.contiguous(), 1), m1)


def test_fused_path_with_a_given_mirror_mask():
    x = batch(32)
    fill = torch.tensor([125, 123, 114], dtype=torch.uint8)
    mirror = torch.arange(32) % 3 == 0
    g1, g2 = gen(5), gen(5)
    expected = random_crop(x, 4, g1, "reflect")
    expected = torch.where(mirror.view(-1, 1, 1, 1), expected.flip(-1), expected)
    expected = cutout(expected, 8, g1, fill)
    assert torch.equal(crop_flip_cutout(x, 4, "reflect", True, 8, g2, fill, mirror), expected)


def test_batch_augment_alternate_mode_mirrors_consecutive_epochs():
    x = batch(64)
    aug = BatchAugment(DataConfig(crop_padding=0, cutout_size=0, flip_mode="alternate"), torch.device("cpu"), 0,
                       torch.float32)
    first = aug.train(x)
    again = aug.train(x)  # same epoch: same flips (no random draw)
    aug.epoch = 1
    second = aug.train(x)
    assert torch.equal(first, again) and torch.equal(second, first.flip(-1))
    plain = aug.normalize(x)
    assert 10 < sum(torch.equal(first[i], plain[i]) for i in range(64)) < 54


@pytest.mark.parametrize("size", [8, 5])
def test_inside_cutout_squares_lie_wholly_inside_at_every_position(size):
    """The seed's CoarseDropout placement: the whole square inside, its top-left uniform over 0..32-size."""
    mask = cutout_squares(4000, 32, 32, size, gen(), torch.device("cpu"), place="inside")
    assert (mask.sum(dim=(1, 2)) == size * size).all()  # never clipped
    tops = mask.any(dim=2).float().argmax(dim=1)
    lefts = mask.any(dim=1).float().argmax(dim=1)
    assert set(tops.tolist()) == set(range(33 - size)) == set(lefts.tolist())


def test_cutout_holes_and_probability_follow_the_seeds_coarse_dropout():
    """1..3 squares per image (uniform), and none at all for about 1 - p of the images."""
    n = 6000
    mask = cutout_squares(n, 32, 32, 8, gen(), torch.device("cpu"), place="inside", max_holes=3, p=0.8)
    covered = mask.sum(dim=(1, 2))
    assert abs((covered == 0).float().mean().item() - 0.2) < 0.02
    assert covered.max() <= 3 * 64 and (covered[covered > 0] >= 64).all()
    # with p = 0.8 and 1, 2 or 3 squares (overlaps aside), the mean cover is 0.8 * 2 * 64 = 102.4 pixels
    assert 90 < covered.float().mean().item() < 104


def test_default_cutout_draws_what_it_drew_before_its_options_existed():
    """One centred square, always: the same random numbers as the pre-option code, so earlier runs reproduce."""
    g1, g2 = gen(7), gen(7)
    mask = cutout_squares(64, 32, 32, 8, g1, torch.device("cpu"))
    cy = torch.randint(0, 32, (64, 1), generator=g2) - 4
    cx = torch.randint(0, 32, (64, 1), generator=g2) - 4
    ry, rx = torch.arange(32) - cy, torch.arange(32) - cx
    old = ((ry >= 0) & (ry < 8))[:, :, None] & ((rx >= 0) & (rx < 8))[:, None, :]
    assert torch.equal(mask, old)


@pytest.mark.parametrize(("place", "holes", "p"), [("inside", 1, 1.0), ("inside", 3, 0.8), ("centre", 2, 0.5)])
def test_fused_path_equals_the_separate_functions_with_cutout_options(place, holes, p):
    x = batch(64)
    fill = torch.tensor([125, 123, 114], dtype=torch.uint8)
    g1, g2 = gen(9), gen(9)
    expected = random_flip(random_crop(x, 4, g1, "reflect"), g1)
    expected = cutout(expected, 8, g1, fill, place, holes, p)
    assert torch.equal(crop_flip_cutout(x, 4, "reflect", True, 8, g2, fill, None, place, holes, p), expected)


def test_batch_augment_always_mode_mirrors_every_image():
    x = batch(32)
    always = BatchAugment(DataConfig(crop_padding=0, cutout_size=0, flip_mode="always"), torch.device("cpu"), 0,
                          torch.float32)
    plain = BatchAugment(DataConfig(crop_padding=0, cutout_size=0, flip=False), torch.device("cpu"), 0,
                         torch.float32)
    assert torch.equal(always.train(x), plain.train(x).flip(-1))


@pytest.mark.parametrize("size", [8, 24, 31])
def test_random_window_is_a_window_of_each_image_at_its_own_place(size):
    x = batch(32)
    out = random_window(x, size, gen())
    assert out.shape == (32, 3, size, size) and out.dtype == torch.uint8
    places = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(33 - size) for dx in range(33 - size)
                   if torch.equal(x[i, :, dy:dy + size, dx:dx + size], out[i])]
        assert matches, f"image {i} is not a window of its input"
        places.add(matches[0])
    assert len(places) > 1


def test_a_full_size_window_or_scale_is_the_image_itself():
    x = batch()
    assert random_window(x, 32, gen()) is x
    assert torch.equal(scale_down(x.float(), 32), x.float())


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("window", [16, 24, 28])
def test_fused_path_with_a_window_equals_the_separate_functions(pad_mode, window):
    x, fill = batch(), torch.tensor([125, 123, 114], dtype=torch.uint8)
    fused = crop_flip_cutout(x, 4, pad_mode, True, 8, gen(3), fill, window=window)
    g = gen(3)
    expected = random_window(cutout(random_flip(random_crop(x, 4, g, pad_mode), g), 8, g, fill), window, g)
    assert torch.equal(fused, expected)
    assert fused.is_contiguous(memory_format=torch.channels_last)


def test_scale_down_keeps_a_flat_image_flat_and_averages():
    flat = torch.full((2, 3, 32, 32), 0.25)
    assert torch.allclose(scale_down(flat, 24), torch.full((2, 3, 24, 24), 0.25))
    stripes = torch.zeros(1, 1, 32, 32)
    stripes[..., ::2] = 1.0  # antialiasing averages the 1-pixel stripes instead of picking some of them
    inner = scale_down(stripes, 24)[..., 1:-1]
    aliased = F.interpolate(stripes, size=(24, 24), mode="bilinear")[..., 1:-1]
    assert inner.max() - inner.min() < 0.5 * (aliased.max() - aliased.min())
    assert torch.allclose(scale_down(stripes, 16)[..., 1:-1], torch.full((1, 1, 16, 14), 0.5), atol=1e-5)


@pytest.mark.parametrize("mode", ["crop", "scale"])
def test_low_res_epochs_train_small_images_then_full_size_ones(mode):
    cfg = DataConfig(low_res_size=24, low_res_epochs=2, low_res_mode=mode)
    aug = BatchAugment(cfg, torch.device("cpu"), 0, torch.bfloat16)
    sides = []
    for epoch in range(4):
        aug.epoch = epoch
        out = aug.train(batch())
        assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
        assert out.shape[-1] == out.shape[-2] == aug.side_at(epoch)
        sides.append(out.shape[-1])
    assert sides == [24, 24, 32, 32]


def test_without_low_res_epochs_the_augmentation_draws_what_it_drew_before():
    x = batch()
    plain = BatchAugment(DataConfig(), torch.device("cpu"), 5, torch.float32)
    off = BatchAugment(DataConfig(low_res_size=24, low_res_epochs=0), torch.device("cpu"), 5, torch.float32)
    ended = BatchAugment(DataConfig(low_res_size=24, low_res_epochs=1), torch.device("cpu"), 5, torch.float32)
    plain.epoch = off.epoch = ended.epoch = 1  # after the low-res epoch: the full-size path, the same draws
    expected = plain.train(x)
    assert torch.equal(expected, off.train(x)) and torch.equal(expected, ended.train(x))
