"""Stage 2 train augmentation (pacx.data.augment,
docs/datasets.md#stage-2-data): order, parameters, firing rates.

The firing rates are measured with seeded draws on inputs that make each step detectable:
- a constant normalised image stays free of exact zeros through crop, affine (fill is 0 in *pixel*
  space, which is -mean/std normalised), jitter and blur, so an all-channel zero marks RandomErasing;
- with the other steps off and a full-scale crop, any change of a noise image marks the step under test.
Tolerances are about 4.5 binomial standard deviations (the seeds make the runs deterministic).
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pacx.constants import IMAGENET_MEAN, IMAGENET_STD
from pacx.data.augment import Denormalize, RobustTrainTransforms
from pacx.data.symile import CXR_TRANSFORMS, build_cxr_transform

OFF = {"affine_p": 0.0, "jitter_p": 0.0, "blur_p": 0.0, "erase_p": 0.0}
FULL_CROP = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}


def normalised_noise(size: int, seed: int = 0) -> torch.Tensor:
    """A normalised [3, size, size] image whose pixels lie in (0.1, 0.9) before normalisation."""
    g = torch.Generator().manual_seed(seed)
    pixels = 0.1 + 0.8 * torch.rand(3, size, size, generator=g)
    return TF.normalize(pixels, list(IMAGENET_MEAN), list(IMAGENET_STD))


def rate(fired: list[bool]) -> float:
    return sum(fired) / len(fired)


def assert_rate(fired: list[bool], p: float) -> None:
    tol = 4.5 * math.sqrt(p * (1 - p) / len(fired))
    assert abs(rate(fired) - p) < tol, (f"fired {rate(fired):.3f} of {len(fired)} draws, "
                                        f"expected {p} ± {tol:.3f}")


def test_registered_and_defaults_are_the_reference_values():
    assert CXR_TRANSFORMS["robust_train"] is RobustTrainTransforms
    t = build_cxr_transform("robust_train", 224)
    assert (tuple(t.crop.size), t.crop.scale, t.crop.ratio, t.crop.antialias) == ((224, 224), (0.75, 1.0),
                                                                                  (0.85, 1.15), True)
    assert t.affine.p == 0.6
    affine = t.affine.transforms[0]
    assert (affine.degrees, affine.translate, affine.scale) == ([-10.0, 10.0], (0.1, 0.1), (0.9, 1.1))
    assert affine.fill == 0
    assert t.jitter.p == 0.3
    jitter = t.jitter.transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.8, 1.2), (0.8, 1.2),
                                                                                   None, None)
    assert t.blur.p == 0.15
    blur = t.blur.transforms[0]
    assert (blur.kernel_size, blur.sigma) == ((5, 5), [0.1, 2.0])
    assert (t.normalize.mean, t.normalize.std) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert (t.erase.p, t.erase.scale, t.erase.ratio, t.erase.value) == (0.25, (0.02, 0.1), (0.3, 3.3), [0.0])
    steps = [name for name, _ in t.named_children()]
    assert steps == ["denormalize", "crop", "affine", "jitter", "blur", "normalize", "erase"]


def test_arguments_reach_the_steps():
    t = RobustTrainTransforms(96, crop_scale=(0.5, 0.9), affine_p=0.1, affine_degrees=(-3, 5), jitter_p=0.2,
                              brightness=0.4, blur_p=0.05, blur_sigma=(1.0, 1.5), erase_p=0.5,
                              erase_value=-1.0)
    assert tuple(t.crop.size) == (96, 96) and t.crop.scale == (0.5, 0.9)
    assert t.affine.p == 0.1 and t.affine.transforms[0].degrees == [-3.0, 5.0]
    assert t.jitter.p == 0.2 and t.jitter.transforms[0].brightness == (0.6, 1.4)
    assert t.blur.p == 0.05 and t.blur.transforms[0].sigma == [1.0, 1.5]
    assert t.erase.p == 0.5 and t.erase.value == [-1.0]


def test_output_shape_dtype_and_picklable():
    torch.manual_seed(0)
    t = pickle.loads(pickle.dumps(build_cxr_transform("robust_train", 224)))  # DataLoader workers (spawn)
    x = normalised_noise(320)
    for _ in range(3):
        y = t(x)
        assert y.shape == (3, 224, 224) and y.dtype == torch.float32
    assert torch.equal(x, normalised_noise(320)), "the input must not be modified in place"


def test_seeded_draws_repeat():
    t = RobustTrainTransforms(64)
    x = normalised_noise(80)
    torch.manual_seed(3)
    first = [t(x) for _ in range(5)]
    torch.manual_seed(3)
    assert all(torch.equal(a, t(x)) for a in first)


def test_rejects_non_image_input():
    with pytest.raises(ValueError, match="float CXR tensor"):
        RobustTrainTransforms(32)(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="float CXR tensor"):
        RobustTrainTransforms(32)(torch.zeros(3, 32, 32, dtype=torch.uint8))


def test_round_trip_is_exact_without_augmentations():
    x = normalised_noise(64)
    back = TF.normalize(Denormalize()(x), list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)
    pixels = Denormalize()(x)
    assert 0.1 - 1e-6 <= pixels.min() and pixels.max() <= 0.9 + 1e-6  # back in pixel space
    t = RobustTrainTransforms(64, **OFF, **FULL_CROP)  # same size: the crop/resize is the identity
    torch.testing.assert_close(t(x), x, rtol=0, atol=1e-6)


def test_all_off_with_full_crop_equals_resize():
    t = RobustTrainTransforms(224, **OFF, **FULL_CROP)
    resize = build_cxr_transform("resize", 224)
    x = normalised_noise(320)
    torch.testing.assert_close(t(x), resize(x), rtol=0, atol=2e-5)


def test_random_erasing_fires_at_its_rate_on_the_full_default_pipeline():
    """Zero pixels (all channels) only come from RandomErasing; its area is scale (0.02, 0.1) of the image."""
    torch.manual_seed(0)
    t = RobustTrainTransforms(48)  # every default probability on
    x = torch.ones(3, 320, 320)  # constant and non-zero in normalised space
    fired, areas = [], []
    for _ in range(600):
        zero = (t(x) == 0).all(dim=0)  # [H, W]
        fired.append(bool(zero.any()))
        if fired[-1]:
            areas.append(zero.float().mean().item())
    assert_rate(fired, 0.25)
    assert min(areas) >= 0.02 * 0.7 and max(areas) <= 0.1 * 1.3, (min(areas), max(areas))  # rounding of h, w


@pytest.mark.parametrize(
    ("step", "overrides", "p"),
    [
        ("affine", {"affine_p": 0.6}, 0.6),
        ("jitter", {"jitter_p": 0.3}, 0.3),
        # sigma >= 0.5 so each blur visibly changes pixels (sigma 0.1 is numerically the identity)
        ("blur", {"blur_p": 0.15, "blur_sigma": (0.5, 2.0)}, 0.15),
    ],
)
def test_step_fires_at_its_probability(step, overrides, p):
    torch.manual_seed(1)
    t = RobustTrainTransforms(48, **{**OFF, **overrides}, **FULL_CROP)
    x = normalised_noise(48)
    fired = [not torch.allclose(t(x), x, rtol=0, atol=1e-4) for _ in range(500)]
    assert_rate(fired, p)


def test_default_probabilities_fire_together():
    """Default probabilities, full-scale crop: a noise image is left unchanged only when no step fired."""
    torch.manual_seed(2)
    t = RobustTrainTransforms(48, blur_sigma=(0.5, 2.0), **FULL_CROP)
    x = normalised_noise(48)
    untouched = [torch.allclose(t(x), x, rtol=0, atol=1e-4) for _ in range(600)]
    assert_rate(untouched, (1 - 0.6) * (1 - 0.3) * (1 - 0.15) * (1 - 0.25))
