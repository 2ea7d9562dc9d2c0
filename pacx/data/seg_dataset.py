"""Paired image + mask dataset and DataModule for the segmentation benchmarks (docs/datasets.md#segmentation).

Manifest rows name ``img_path`` and ``mask_path`` under the image root; both decode through
:func:`pacx.data.images.open_image` and resize to ``img_size`` (masks nearest-neighbour unless
``mask_interpolation: bilinear``), with the same flip and rotation in training. Output: image ``[3, S, S]``,
mask ``[1, S, S]`` in {0, 1}. Bad rows are errors naming the CSV; ``batch_size`` is the global batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from pacx.constants import IMAGENET_MEAN, IMAGENET_STD
from pacx.data.images import ImageDecodeError, open_image
from pacx.data.manifest import ManifestError, read_manifest, require_rows, row_ref
from pacx.data.registry import get_benchmark
from pacx.data.stage3 import SplitsDataModule

log = logging.getLogger(__name__)

MAX_ROTATION_DEG = 10.0
FLIP_P = 0.5
# mask_interpolation name -> torchvision mode
MASK_INTERPOLATIONS = {"nearest": TF.InterpolationMode.NEAREST, "bilinear": TF.InterpolationMode.BILINEAR}


def paired_train_augment(image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The same random horizontal flip (p 0.5) then rotation in [−10°, 10°] (nearest, fill 0) on both.

    Drawn from torch's generator, which :func:`pacx.data.resumable.seed_sample` seeds per sample."""
    if torch.rand(()).item() < FLIP_P:
        image, mask = TF.hflip(image), TF.hflip(mask)
    angle = torch.empty(()).uniform_(-MAX_ROTATION_DEG, MAX_ROTATION_DEG).item()
    return TF.rotate(image, angle, fill=0), TF.rotate(mask, angle, fill=0)


class SegmentationDataset(Dataset):
    """Rows of a segmentation manifest -> (image ``[3, S, S]``, mask ``[1, S, S]`` in {0, 1})."""

    def __init__(self, df: pd.DataFrame, root: str | Path, path_column: str, mask_column: str, img_size: int,
                 train: bool, source: str = "<manifest>", mask_interpolation: str = "nearest",
                 cache_decoded: bool = False) -> None:
        if mask_interpolation not in MASK_INTERPOLATIONS:
            raise ValueError(f"mask_interpolation {mask_interpolation!r} not in "
                             f"{sorted(MASK_INTERPOLATIONS)}")
        self.mask_mode = MASK_INTERPOLATIONS[mask_interpolation]
        require_rows(len(df), source, "image/mask pairs")
        self.rows = df.index.to_numpy()  # the manifest's own rows, for error messages
        self.df = df.reset_index(drop=True)
        self.root = Path(root)
        self.path_column, self.mask_column = path_column, mask_column
        self.img_size, self.train, self.source = img_size, train, source
        # idx -> the decoded, resized (image, mask), kept after the first read (cache_decoded)
        self.decoded: dict[int, tuple[Image.Image, Image.Image]] | None = {} if cache_decoded else None

    def __len__(self) -> int:
        return len(self.df)

    def _open(self, idx: int, column: str, mode: str) -> Image.Image:
        path = self.root / str(self.df.at[idx, column])
        if not path.is_file():
            raise ManifestError(f"{self.source}: {row_ref(self.rows[idx])}: {column} file not found: {path}")
        try:
            return open_image(path, mode)
        except (OSError, ImageDecodeError) as err:
            raise ManifestError(f"{self.source}: {row_ref(self.rows[idx])}: cannot read {column} {path}: "
                                f"{err}") from err

    def resized(self, idx: int) -> tuple[Image.Image, Image.Image]:
        """Row ``idx``'s image (RGB) and mask (L), decoded and resized to ``img_size``: deterministic, so
        with ``cache_decoded`` they are read once and kept."""
        if self.decoded is not None and idx in self.decoded:
            return self.decoded[idx]
        image = self._open(idx, self.path_column, "RGB")
        mask = self._open(idx, self.mask_column, "L")
        if mask.size != image.size:
            raise ManifestError(
                f"{self.source}: {row_ref(self.rows[idx])}: mask "
                f"{self.root / str(self.df.at[idx, self.mask_column])} is {mask.size[0]}x{mask.size[1]} but "
                f"its image is {image.size[0]}x{image.size[1]}"
            )
        size = [self.img_size, self.img_size]
        image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR)
        mask = TF.resize(mask, size, interpolation=self.mask_mode)
        if self.decoded is not None:
            self.decoded[idx] = image, mask
        return image, mask

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.resized(idx)
        if self.train:
            image, mask = paired_train_augment(image, mask)
        x = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)  # [3, S, S]
        y = (TF.to_tensor(mask) > 0.5).float()  # [1, S, S]
        return x, y


class SegmentationDataModule(SplitsDataModule):
    """Images + binary masks of one segmentation benchmark (docs/datasets.md#segmentation).

    Args:
        benchmark: registry name of a ``segmentation`` entry.
        root: the image root the manifest paths are relative to.
        manifest_dir: where the converter wrote ``{train,val,test}.csv``.
        batch_size: the **global** batch (256 in docs/datasets.md#stage-3-settings).
        num_workers, pin_memory: DataLoader settings.
        img_size: square resize size of image and mask.
        mask_interpolation: ``nearest`` (default) or ``bilinear`` (the reference) for resizing masks.
        cache_decoded: keep every image and mask in memory once decoded and resized (per loader process;
            the same tensors, without decoding each file every epoch). For splits that fit in RAM: about
            ``4 * img_size**2`` bytes a pair (0.2 MB at 224 px, 16 KB at the demo's 64 px).
    """

    def __init__(self, benchmark: str, root: str, manifest_dir: str, batch_size: int, num_workers: int = 16,
                 img_size: int = 224, pin_memory: bool = True,
                 mask_interpolation: Literal["nearest", "bilinear"] = "nearest",
                 cache_decoded: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = get_benchmark(benchmark)
        if self.spec.task != "segmentation":
            raise ValueError(f"{benchmark} is a {self.spec.task} benchmark, not segmentation")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"segmentation image root not found: {root}")
        self.per_device_batch = batch_size
        self.datasets: dict[str, SegmentationDataset] = {}

    def build_dataset(self, split: str) -> SegmentationDataset:
        h, spec = self.hparams, self.spec
        path = Path(self.required("manifest_dir")) / spec.manifest_files[split]
        df = read_manifest(path, [spec.path_column, spec.mask_column])
        root = Path(self.required("root")) / spec.image_dirs[split]
        ds = SegmentationDataset(df, root, spec.path_column, spec.mask_column, h.img_size,
                                 train=split == "train", source=str(path),
                                 mask_interpolation=h.mask_interpolation, cache_decoded=h.cache_decoded)
        log.info("%s %s: %d image/mask pairs (%s)", spec.name, split, len(ds), path)
        return ds

