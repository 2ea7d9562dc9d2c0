"""Batched augmentation on cached uint8 images: the collate functions of the fast image path.

Each collate takes :class:`pacx.data.cache.CachedImageDataset` samples ``(uint8 [C, S, S], (w, h), labels)``
and returns ``(images, labels [B, K])``. Crops, flips and resizes stay in uint8, with crop boxes drawn in
original-image coordinates; batches are normalised on the accelerator by :func:`normalize_batch`
(``normalize=True``: in the worker). Why: docs/design.md#image-cache.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pacx.constants import IMAGENET_MEAN, IMAGENET_STD


def sample_crop_boxes(orig_wh: torch.Tensor, scale: Sequence[float] = (0.5, 1.0),
                      ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop boxes ``(top, left, height, width)`` int64 [B, 4] in original pixels.

    Same distribution as torchvision's ``RandomResizedCrop.get_params``, vectorised: per image, up to
    ``attempts`` draws of area ~ U(scale) * W * H and log-uniform aspect ratio; the first draw that fits
    wins (drawing all attempts up front and taking the first fit is the same law), else a centre crop
    with the aspect ratio clamped to ``ratio``.
    """
    W, H = orig_wh[:, 0].double(), orig_wh[:, 1].double()  # [B]
    b = len(W)
    area = torch.empty(b, attempts, dtype=torch.float64).uniform_(*scale, generator=generator) * (W * H)[:,
                                                                                                         None]
    aspect = torch.exp(torch.empty(b, attempts, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()  # [B, attempts]
    fits = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    first = fits.byte().argmax(1, keepdim=True)  # index of the first fitting attempt
    found = fits.any(1)
    in_ratio = W / H
    fb_w = torch.where(in_ratio > ratio[1], (H * ratio[1]).round(), W)
    fb_h = torch.where(in_ratio < ratio[0], (W / ratio[0]).round(), H)
    w = torch.where(found, w.gather(1, first)[:, 0], fb_w)
    h = torch.where(found, h.gather(1, first)[:, 0], fb_h)
    u = torch.rand(b, 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, (u[:, 0] * (H - h + 1)).floor(), ((H - h) / 2).floor())
    left = torch.where(found, (u[:, 1] * (W - w + 1)).floor(), ((W - w) / 2).floor())
    return torch.stack([top, left, h, w], 1).long()


def scale_boxes(boxes: torch.Tensor, orig_wh: torch.Tensor, size: int) -> torch.Tensor:
    """Boxes in original pixels -> int64 boxes in an S×S cache (scaled by S/W, S/H, at least 1 px)."""
    sy, sx = size / orig_wh[:, 1].double(), size / orig_wh[:, 0].double()
    top, left, h, w = boxes.double().unbind(1)
    top, left = (top * sy).round().clamp(0, size - 1), (left * sx).round().clamp(0, size - 1)
    h = (h * sy).round().clamp(min=1).minimum(size - top)
    w = (w * sx).round().clamp(min=1).minimum(size - left)
    return torch.stack([top, left, h, w], 1).long()


def crop_flip_resize(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample: crop ``boxes`` (top, left, h, w; int), resize to out×out (bilinear, antialiased), flip.

    images [B, C, Hi, Wi] (uint8 or float) -> [B, C, out, out] of the same dtype, written into ``out``.
    Equals torchvision's ``resized_crop(img, top, left, h, w, [out, out], antialias=True)``.
    """
    b, c = images.shape[:2]
    if out is None:
        out = torch.empty(b, c, out_size, out_size, dtype=images.dtype)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = images[i : i + 1, :, top : top + h, left : left + w]
        res = F.interpolate(crop, size=(out_size, out_size), mode="bilinear", antialias=True,
                            align_corners=False)
        out[i] = res[0].flip(-1) if flip[i] else res[0]
    return out


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker it lives in shared memory, as in ``default_collate``, so
    sending the batch to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def normalize_batch(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8-valued [B, 1 or 3, H, W] (any dtype, any device) -> float32 [B, 3, H, W] ImageNet-normalised.

    ``ToDtype(scale=True)`` then ``Normalize``: per output channel, copy (converting) and then an in-place
    ``(x - 255 mean) / (255 std)``; one input channel feeds all three. Per channel rather than broadcast
    because that is 2x faster on CPU.
    """
    if out is None:
        out = torch.empty(len(images), 3, *images.shape[2:], device=images.device)
    for c in range(3):
        channel = out[:, c]
        channel.copy_(images[:, c if images.shape[1] == 3 else 0])
        channel.sub_(255 * mean[c]).mul_(1 / (255 * std[c]))
    return out


class BatchedTransform:
    """Collate: stack cached uint8 samples, apply :meth:`spatial` in uint8, optionally normalise.

    Returns uint8 [B, C, H, W] (``normalize=False``, the default: normalise on the device with
    :func:`normalize_batch`) or float32 [B, 3, H, W] ImageNet-normalised (``normalize=True``).
    """

    def __init__(self, img_size: int, normalize: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.img_size, self.normalize, self.mean, self.std = img_size, normalize, tuple(mean), tuple(std)

    def spatial(self, x: torch.Tensor, orig_wh: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, orig_wh, labels = zip(*samples)
        x = torch.stack(imgs)  # uint8 [B, C, S, S]
        shape = (len(x), x.shape[1], self.img_size, self.img_size)
        spatial = self.spatial(x, torch.stack(orig_wh), torch.empty(shape, dtype=x.dtype) if self.normalize
                               else batch_buffer(shape, x.dtype))
        if self.normalize:
            spatial = normalize_batch(spatial, self.mean, self.std, batch_buffer((len(x), 3, *shape[2:])))
        return spatial, torch.stack(labels)


class BatchedCropFlip(BatchedTransform):
    """Collate for ``mae_train``: RandomResizedCrop(img_size, crop_scale, ratio) + horizontal flip."""

    def __init__(self, img_size: int = 224, crop_scale: Sequence[float] = (0.5, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5, **kwargs) -> None:
        super().__init__(img_size, **kwargs)
        self.crop_scale, self.ratio, self.hflip = tuple(crop_scale), tuple(ratio), hflip

    def spatial(self, x: torch.Tensor, orig_wh: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        boxes = scale_boxes(sample_crop_boxes(orig_wh, self.crop_scale, self.ratio), orig_wh, x.shape[-1])
        flip = torch.rand(len(x)) < self.hflip
        return crop_flip_resize(x, boxes, flip, self.img_size, out)


class BatchedResize(BatchedTransform):
    """Collate for ``resize_eval`` (``hflip=0``) and ``resize_flip_train``: square resize, optional flip.

    At ``img_size`` equal to the cache size the pixels are exactly those of the PIL eval path; otherwise one
    antialiased bilinear resize of the cached squares.
    """

    def __init__(self, img_size: int = 224, hflip: float = 0.0, **kwargs) -> None:
        super().__init__(img_size, **kwargs)
        self.hflip = hflip

    def spatial(self, x: torch.Tensor, orig_wh: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False)
        flip = torch.rand(len(x)) < self.hflip
        out.copy_(x)
        if flip.any():
            out[flip] = out[flip].flip(-1)
        return out


# Transform name in configs (pacx.data.transforms.TRANSFORMS) -> its batched equivalent on the cache.
BATCHED_TRANSFORMS: dict[str, Callable[..., BatchedTransform]] = {
    "mae_train": BatchedCropFlip,
    "resize_eval": BatchedResize,
    "resize_flip_train": functools.partial(BatchedResize, hflip=0.5),
}


def build_batched_transform(name: str, **kwargs) -> BatchedTransform:
    """The collate for transform ``name`` (same kwargs as ``pacx.data.transforms.build_transform``)."""
    if name not in BATCHED_TRANSFORMS:
        raise KeyError(f"unknown batched transform {name!r}; known: {sorted(BATCHED_TRANSFORMS)}")
    return BATCHED_TRANSFORMS[name](**kwargs)
