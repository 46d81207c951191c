"""Training augmentation as pure functions over whole batches, on whatever device the batch is on.

Each function takes a uint8 batch [N, C, H, W] (any memory format) and returns a new tensor; each image
gets its own random draws from the `torch.Generator` passed in (which must live on the batch's device),
so a seeded generator reproduces a batch exactly. Nothing here loops over images or reads a value back
to the host, so on a GPU a batch costs a handful of kernel launches and no synchronisation.

Order used in training (`BatchAugment`): random crop (pad 4) -> horizontal flip -> cutout 8x8 ->
normalise. `BatchAugment.train` does the first three as ONE gather (`crop_flip_cutout`): each output
pixel's source index already accounts for the shift, the mirror, the padding and the cutout square
(padding and cutout read two extra "pixels" holding their colours). It draws the same random numbers in
the same order as the three separate functions and gives exactly their result with fewer passes over
the batch (a development micro-benchmark, not in the repo, gave ~1.4x for augmentation + normalisation);
the separate functions stay as the readable reference that the tests compare it with.

Progressive resizing (`data.low_res_size` for the first `data.low_res_epochs` epochs) makes each augmented image
smaller in one of two ways: `random_window` (crop mode: a random window, folded into the same gather as the rest)
or `scale_down` (scale mode: the whole image resized, after normalisation).

Cutout runs before normalisation and fills with the dataset's mean colour, which is what a
zero fill after normalisation would give (up to uint8 rounding): both mean "no information".
"""

from __future__ import annotations

import torch

from fastcifar.config import DataConfig

# CIFAR-10 training-set statistics (per channel, RGB, on the 0..1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _source_index(shift: torch.Tensor, size: int, pad_mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For output positions 0..size-1 shifted by `shift` [N, 1]: source positions [N, size] inside the
    image, and (zero padding only) a mask of the positions that fall in the image."""
    pos = torch.arange(size, device=shift.device) + shift
    if pad_mode == "reflect":  # -1 -> 1, size -> size - 2 (edge pixel not repeated, like numpy/torch "reflect")
        pos = pos.abs()
        return torch.where(pos >= size, 2 * (size - 1) - pos, pos), None
    inside = (pos >= 0) & (pos < size)
    return pos.clamp(0, size - 1), inside


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator,
                pad_mode: str = "zeros") -> torch.Tensor:
    """A random HxW window of each image padded by `padding` pixels (zeros or reflection), per image.

    Done as one gather over pixel rows of the NHWC view instead of padding and slicing: no padded copy,
    and reflection is just another source index.
    """
    if padding == 0:
        return images
    n, c, h, w = images.shape
    shifts = torch.randint(-padding, padding + 1, (2, n, 1), generator=generator, device=images.device)
    rows, rows_in = _source_index(shifts[0], h, pad_mode)
    cols, cols_in = _source_index(shifts[1], w, pad_mode)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(n, h * w, 1).expand(n, h * w, c)
    pixels = images.permute(0, 2, 3, 1).reshape(n, h * w, c)  # free view for channels_last input
    out = pixels.gather(1, flat).view(n, h, w, c)
    if rows_in is not None:
        inside = rows_in[:, :, None, None] & cols_in[:, None, :, None]
        out = out * inside.to(out.dtype)
    return out.permute(0, 3, 1, 2)  # back to logical NCHW, channels_last in memory


def random_flip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def alternating_mirror(images: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images to mirror in `epoch` for alternating flips: a fixed per-image bit (the parity of the
    sum of its pixel values: no image index needed, the same in any order or batch) XOR the epoch's parity,
    so each image is mirrored in every other epoch. Returns a bool [N]."""
    parity = images.sum(dim=(1, 2, 3), dtype=torch.int64) & 1
    return parity.bool() ^ bool(epoch % 2)


def cutout_squares(n: int, h: int, w: int, size: int, generator: torch.Generator, device: torch.device,
                   place: str = "centre", max_holes: int = 1, p: float = 1.0) -> torch.Tensor:
    """Which pixels the cutout covers: a bool [N, H, W] mask of up to `max_holes` size x size squares per image.

    place "centre": each square's centre is uniform over the image and the square is clipped at the border
    (DeVries & Taylor's cutout). place "inside": each square lies wholly inside the image, its top-left corner
    uniform over the positions that allow it (Albumentations' CoarseDropout, which the seed's code used).
    With max_holes > 1 each image gets a uniform 1..max_holes squares (they may overlap), and with p < 1 an image
    gets none with probability 1 - p (also CoarseDropout's). The default draws (one centred square, always)
    are the same numbers, in the same order, as before these options existed, so earlier runs reproduce.
    """
    holes = (torch.randint(1, max_holes + 1, (n, 1), generator=generator, device=device)
             if max_holes > 1 else None)
    applied = torch.rand(n, 1, generator=generator, device=device) < p if p < 1 else None
    if place == "inside":
        low, high_y, high_x = 0, h - size + 1, w - size + 1
    else:
        low, high_y, high_x = -(size // 2), h - size // 2, w - size // 2
    mask = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    for k in range(max_holes):
        top = torch.randint(0, high_y - low, (n, 1), generator=generator, device=device) + low
        left = torch.randint(0, high_x - low, (n, 1), generator=generator, device=device) + low
        ry, rx = torch.arange(h, device=device) - top, torch.arange(w, device=device) - left  # [N, H], [N, W]
        square = ((ry >= 0) & (ry < size))[:, :, None] & ((rx >= 0) & (rx < size))[:, None, :]
        if holes is not None:
            square &= (holes > k)[:, :, None]
        if applied is not None:
            square &= applied[:, :, None]
        mask |= square
    return mask


def cutout(images: torch.Tensor, size: int, generator: torch.Generator, fill: torch.Tensor,
           place: str = "centre", max_holes: int = 1, p: float = 1.0) -> torch.Tensor:
    """Fill the squares of `cutout_squares` (see there for `place`, `max_holes` and `p`) with `fill` ([C])."""
    if size == 0:
        return images
    n, c, h, w = images.shape
    inside = cutout_squares(n, h, w, size, generator, images.device, place, max_holes, p)
    return torch.where(inside[:, None], fill.view(1, c, 1, 1).to(images.dtype), images)


def window_offsets(n: int, side: int, size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Top and left corners [2, N, 1] of a random `size` x `size` window in each `side` x `side` image, uniform over
    the positions that keep the window inside the image."""
    return torch.randint(0, side - size + 1, (2, n, 1), generator=generator, device=device)


def take_window(maps: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` x `size` window at `offsets` (from `window_offsets`) of each map [N, ..., H, W] (images or
    index maps), as a new tensor [N, ..., size, size]."""
    span = torch.arange(size, device=maps.device)
    rows, cols = offsets[0] + span, offsets[1] + span  # [N, size] each
    extra = maps.dim() - 3  # leading dims between N and H (the channels of images)
    n, w = maps.shape[0], maps.shape[-1]
    rows = rows.view(n, *([1] * extra), size, 1).expand(*maps.shape[:-2], size, w)
    out = maps.gather(-2, rows)
    cols = cols.view(n, *([1] * extra), 1, size).expand(*maps.shape[:-2], size, size)
    return out.gather(-1, cols)


def random_window(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random `size` x `size` window of each image (progressive resizing's crop mode: the objects keep the scale
    of the test images, the window shows less of them)."""
    n, _, h, w = images.shape
    if size >= min(h, w):
        return images
    return take_window(images, window_offsets(n, h, size, generator, images.device), size)


def scale_down(images: torch.Tensor, size: int) -> torch.Tensor:
    """Each (float) image resized to `size` x `size`, bilinear with antialiasing (progressive resizing's scale mode:
    the whole image at a lower resolution)."""
    if size >= images.shape[-1]:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 0..255 -> (x / 255 - mean) / std in `dtype`; mean/std are [C] on the 0..1 scale."""
    c = images.shape[1]
    scale = (1.0 / (255.0 * std)).view(1, c, 1, 1)
    shift = (mean / std).view(1, c, 1, 1)
    return torch.addcmul(-shift, images.float(), scale).to(dtype)  # one pass after the conversion


def crop_flip_cutout(images: torch.Tensor, padding: int, pad_mode: str, flip: bool, cutout_size: int,
                     generator: torch.Generator, fill: torch.Tensor,
                     mirror: torch.Tensor | None = None, cutout_place: str = "centre", cutout_max_holes: int = 1,
                     cutout_p: float = 1.0, window: int = 0) -> torch.Tensor:
    """random_crop -> random_flip -> cutout [-> random_window] in one gather (same draws, same result as calling
    them in turn). `mirror` (bool [N]), when given, says which images to flip instead of a random draw. The cutout_*
    arguments are `cutout_squares`'. `window` > 0 (smaller than the image) returns a random window of that side of
    each augmented image (progressive resizing's crop mode); 0 = the whole image.

    Works for uint8 RGB batches: each pixel's 3 bytes plus one spare byte are read as one int32, so the
    gather moves whole pixels (one index per pixel instead of one per channel value)."""
    n, c, h, w = images.shape
    if images.dtype != torch.uint8 or c != 3:
        raise ValueError(f"crop_flip_cutout takes uint8 RGB batches, got {images.dtype} with {c} channels")
    dev = images.device
    pad_pixel, fill_pixel = h * w, h * w + 1  # two extra entries of the pixel table
    rows = cols = torch.arange(h, device=dev).expand(n, h)
    rows_in = cols_in = None
    if padding:
        shifts = torch.randint(-padding, padding + 1, (2, n, 1), generator=generator, device=dev)
        rows, rows_in = _source_index(shifts[0], h, pad_mode)
        cols, cols_in = _source_index(shifts[1], w, pad_mode)
    if flip:  # mirroring the crop = reading its columns right to left
        if mirror is None:
            mirror = torch.rand(n, generator=generator, device=dev) < 0.5
        mirror = mirror.to(dev)[:, None]
        cols = torch.where(mirror, cols.flip(1), cols)
        cols_in = None if cols_in is None else torch.where(mirror, cols_in.flip(1), cols_in)
    rows = rows * w
    if rows_in is not None:  # an outside row or column makes the sum >= h*w, clamped to the pad pixel
        rows, cols = torch.where(rows_in, rows, pad_pixel), torch.where(cols_in, cols, pad_pixel)
    source = rows[:, :, None] + cols[:, None, :]  # [N, H, W]: index into the pixel table
    if rows_in is not None:
        source.clamp_(max=pad_pixel)
    if cutout_size:
        square = cutout_squares(n, h, w, cutout_size, generator, dev, cutout_place, cutout_max_holes, cutout_p)
        source.masked_fill_(square, fill_pixel)
    out_h, out_w = h, w
    if 0 < window < min(h, w):  # the window of the index map: the gather then reads only the window's pixels
        source = take_window(source, window_offsets(n, h, window, generator, dev), window)
        out_h = out_w = window
    table = torch.zeros(n, h * w + 2, 4, dtype=torch.uint8, device=dev)  # RGB + a spare byte per pixel
    table[:, :pad_pixel, :3] = images.permute(0, 2, 3, 1).reshape(n, h * w, c)
    table[:, fill_pixel, :3] = fill
    out = table.view(torch.int32).view(n, h * w + 2).gather(1, source.reshape(n, out_h * out_w))
    # Dropping the spare byte makes a dense channels_last batch again (strided input slows what follows).
    return out.view(torch.uint8).view(n, out_h, out_w, 4)[..., :3].contiguous().permute(0, 3, 1, 2)


class BatchAugment:
    """Training augmentation as the data config says (crop_padding, pad_mode, flip, flip_mode, cutout_*, low_res_*)
    and normalisation, for batches on one device, with its own seeded generator."""

    def __init__(self, data: DataConfig, device: torch.device, seed: int, dtype: torch.dtype,
                 channels_last: bool = True) -> None:
        self.settings = data
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.mean = torch.tensor(CIFAR10_MEAN, device=device)
        self.std = torch.tensor(CIFAR10_STD, device=device)
        self.fill = (self.mean * 255).round().to(torch.uint8)
        self.epoch = 0  # 0-based training epoch; the training loop sets it (alternating flips depend on it)

    def side_at(self, epoch: int, full: int = 32) -> int:
        """The side of the training images in `epoch` (0-based) for images of side `full`: low_res_size in the first
        low_res_epochs epochs (progressive resizing), else `full`."""
        s = self.settings
        return s.low_res_size if epoch < s.low_res_epochs and s.low_res_size < full else full

    def train(self, images: torch.Tensor) -> torch.Tensor:
        s = self.settings
        mirror = None
        if s.flip and s.flip_mode == "alternate":
            mirror = alternating_mirror(images, self.epoch)
        elif s.flip and s.flip_mode == "always":
            mirror = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        full = images.shape[-1]
        side = self.side_at(self.epoch, full)
        window = side if side < full and s.low_res_mode == "crop" else 0
        images = crop_flip_cutout(images, s.crop_padding, s.pad_mode, s.flip, s.cutout_size, self.generator,
                                  self.fill, mirror, s.cutout_place, s.cutout_max_holes, s.cutout_p, window)
        if images.shape[-1] > side:  # scale mode: resize the normalised image (interpolating uint8 is CPU-only)
            out = scale_down(normalize(images, self.mean, self.std, torch.float32), side).to(self.dtype)
            return out.contiguous(memory_format=self.memory_format)
        return self.normalize(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalisation only (what the test pass applies to its batches)."""
        out = normalize(images, self.mean, self.std, self.dtype)
        return out.contiguous(memory_format=self.memory_format)
