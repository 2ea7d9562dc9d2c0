"""Image transforms named in configs (docs/datasets.md#transforms, docs/datasets.md#chexpert): one builder per
name, no if/elif chains."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from pacx.constants import IMAGENET_MEAN, IMAGENET_STD


def _to_normalized_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def mae_train(img_size: int = 224, crop_scale: tuple[float, float] = (0.5, 1.0),
              hflip: float = 0.5) -> Callable:
    """Stage 1 train: RandomResizedCrop(scale 0.5–1, ratio 3/4–4/3), horizontal flip, ImageNet norm."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), antialias=True),
            v2.RandomHorizontalFlip(hflip),
            *_to_normalized_tensor(),
        ]
    )


def resize_eval(img_size: int = 224) -> Callable:
    """Evaluation: square resize (aspect not kept, bilinear with antialias), ImageNet norm."""
    return v2.Compose([v2.Resize((img_size, img_size), antialias=True), *_to_normalized_tensor()])


CLASSIFY_HFLIP = 0.5  # the Stage 3 classification train flip (docs/datasets.md#transforms), also drawn by
# the flip-aware feature cache (pacx.data.feature_cache.FlipFeatureDataset)


def resize_flip_train(img_size: int = 224, hflip: float = CLASSIFY_HFLIP) -> Callable:
    """Stage 3 classification train (docs/datasets.md#transforms): square resize, flip, ImageNet norm."""
    return v2.Compose(
        [v2.Resize((img_size, img_size), antialias=True), v2.RandomHorizontalFlip(hflip),
         *_to_normalized_tensor()]
    )


TRANSFORMS: dict[str, Callable[..., Callable]] = {
    "mae_train": mae_train,
    "resize_eval": resize_eval,
    "resize_flip_train": resize_flip_train,
}


def build_transform(name: str, **kwargs) -> Callable:
    if name not in TRANSFORMS:
        raise KeyError(f"unknown transform {name!r}; known: {sorted(TRANSFORMS)}")
    return TRANSFORMS[name](**kwargs)
