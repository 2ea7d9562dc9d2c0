"""Stage 2 CXR train augmentation (docs/datasets.md#stage-2-data): the reference's ``RobustTrainTransforms``.

Takes and returns ImageNet-normalised tensors (Symile CXRs are stored normalised): it undoes the
normalisation, runs the reference's steps in its order on ``torchvision.transforms.v2`` and normalises again.
Every setting is an argument defaulting to the reference value. Registered as the CXR transform
``robust_train`` of :mod:`pacx.data.symile`; the steps: docs/design.md#stage-2-augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.transforms import v2

from pacx.constants import IMAGENET_MEAN, IMAGENET_STD


class Denormalize(nn.Module):
    """Inverse of ``Normalize(mean, std)`` on a float [C, H, W] tensor: ``x·std + mean`` per channel."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean {list(mean)} and std {list(std)} must have one value per channel")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1)  # broadcast over [C, H, W]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return x * std + mean

    def extra_repr(self) -> str:
        return f"mean={list(self.mean)}, std={list(self.std)}"


class RobustTrainTransforms(nn.Module):
    """docs/datasets.md#stage-2-data train augmentation on a normalised float32 CXR [3, H, W] -> normalised
    [3, img_size, img_size].

    The steps are attributes (``denormalize``, ``crop``, ``affine``, ``jitter``, ``blur``, ``normalize``,
    ``erase``; the three optional ones are ``v2.RandomApply`` with their probability) run in that order.
    Randomness comes from torch's global generator, as in torchvision, so DataLoader workers differ.
    """

    def __init__(
        self,
        img_size: int = 224,
        crop_scale: tuple[float, float] = (0.75, 1.0),
        crop_ratio: tuple[float, float] = (0.85, 1.15),
        affine_p: float = 0.6,
        affine_degrees: float | tuple[float, float] = 10.0,
        affine_translate: tuple[float, float] = (0.1, 0.1),
        affine_scale: tuple[float, float] = (0.9, 1.1),
        affine_fill: float = 0.0,
        jitter_p: float = 0.3,
        brightness: float = 0.2,
        contrast: float = 0.2,
        blur_p: float = 0.15,
        blur_kernel_size: int = 5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        erase_p: float = 0.25,
        erase_scale: tuple[float, float] = (0.02, 0.1),
        erase_ratio: tuple[float, float] = (0.3, 3.3),
        erase_value: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.denormalize = Denormalize(mean, std)
        self.crop = v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                                         antialias=True)
        degrees = tuple(affine_degrees) if isinstance(affine_degrees, Sequence) else affine_degrees
        self.affine = v2.RandomApply(
            [v2.RandomAffine(degrees, translate=tuple(affine_translate), scale=tuple(affine_scale),
                             fill=affine_fill)],
            p=affine_p,
        )
        self.jitter = v2.RandomApply([v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=0,
                                                     hue=0)],
                                     p=jitter_p)
        self.blur = v2.RandomApply([v2.GaussianBlur(blur_kernel_size, sigma=tuple(blur_sigma))], p=blur_p)
        self.normalize = v2.Normalize(list(mean), list(std))
        self.erase = v2.RandomErasing(p=erase_p, scale=tuple(erase_scale), ratio=tuple(erase_ratio),
                                      value=erase_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or not x.is_floating_point():
            raise ValueError(f"expects a normalised float CXR tensor [C, H, W], got {x.dtype} "
                             f"{list(x.shape)}")
        x = self.denormalize(x)  # pixel space, about [0, 1]
        x = self.crop(x)  # [C, img_size, img_size]
        x = self.affine(x)
        x = self.jitter(x)
        x = self.blur(x)
        x = self.normalize(x)
        return self.erase(x)  # erased pixels are `erase_value` in normalised space
