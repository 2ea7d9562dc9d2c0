"""Writers of tiny segmentation releases in their official layouts (docs/datasets.md#segmentation), for tests.

32x32 grey images and binary (0/255) masks at the release's exact paths, about 10-20 images per split,
deterministic for a seed, with one image left without its mask. ``SEG_RELEASE_WRITERS[name](out, seed)``
returns the converter's ``raw`` folder; ``write_covidqu_seg_release`` also takes ``content`` from the phantom.
Paths per release: docs/design.md#test-releases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pacx.testing.images import simple_cxr

SIZE = 32
CXLSEG_SPLIT_SIZES = {"train": 16, "validate": 10, "test": 10}
COVIDQU_PER_CATEGORY = {"Train": 5, "Val": 4, "Test": 4}
COVIDQU_CATEGORIES = ("COVID-19", "Non-COVID", "Normal")
COVIDQU_PREFIXES = {"COVID-19": "covid", "Non-COVID": "non_COVID", "Normal": "Normal"}  # "<prefix> (<k>).png"
QATA_SIZES = {"Train Set": 20, "Test Set": 10}


def _save_pair(rng: np.random.Generator, image: Path, mask: Path | None) -> None:
    """A 32x32 image at ``image`` and, unless ``mask`` is None, its binary mask (dark lung fields)."""
    img = simple_cxr(rng, SIZE, SIZE)
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").save(image)
    if mask is not None:
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.where(img < 110, 255, 0).astype(np.uint8), mode="L").save(mask)


def write_cxlseg_release(out: Path, seed: int = 0) -> Path:
    """Split CSV and JPGs of a CXLSeg release; the last train row's mask is not written. Returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows = []
    subject = 10000000 + int(rng.integers(0, 1000))
    for split, n in CXLSEG_SPLIT_SIZES.items():
        subject += 1000  # patient-disjoint splits, as in MIMIC-CXR
        for i in range(n):
            if i % 2 == 0:  # two images per patient
                subject += int(rng.integers(1, 50))
            study = 50000000 + int(rng.integers(0, 10**7))
            dicom = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))
            rows.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "split": split})
            stem = out / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / dicom
            unpaired = split == "train" and i == n - 1
            _save_pair(rng, stem.with_name(dicom + ".jpg"),
                       None if unpaired else stem.with_name(dicom + "-mask.jpg"))
    pd.DataFrame(rows).to_csv(out / "CXLSeg-split.csv", index=False)
    return out


def write_covidqu_seg_release(out: Path, seed: int = 0,
                              content: Mapping[str, Sequence[dict]] | None = None) -> Path:
    """The lung-segmentation part of COVID-QU-Ex; ``Train/Normal`` has one image without a mask.

    ``content``: per release split (``Train``, ``Val``, ``Test``) dicts of ``category`` (one of
    ``COVIDQU_CATEGORIES``), ``image`` (uint8 [H, W]) and ``mask`` (uint8 [H, W], nonzero = lung), written
    as ``<category prefix> (<k>).png`` numbered per folder; every category folder is created.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    root = out / "Lung Segmentation Data" / "Lung Segmentation Data"
    if content is not None:
        for split, items in content.items():
            for category in COVIDQU_CATEGORIES:
                for folder in ("images", "lung masks"):
                    (root / split / category / folder).mkdir(parents=True, exist_ok=True)
                mine = [item for item in items if item["category"] == category]
                for k, item in enumerate(mine, start=1):
                    name = f"{COVIDQU_PREFIXES[category]} ({k}).png"
                    Image.fromarray(item["image"], mode="L").save(root / split / category / "images" / name)
                    mask = np.where(item["mask"] > 0, 255, 0).astype(np.uint8)
                    Image.fromarray(mask, mode="L").save(root / split / category / "lung masks" / name)
        return out
    for split, n in COVIDQU_PER_CATEGORY.items():
        for category in COVIDQU_CATEGORIES:
            prefix = COVIDQU_PREFIXES[category]
            numbers = sorted(rng.choice(np.arange(1, 500), size=n, replace=False).tolist())
            for k, number in enumerate(numbers):
                name = f"{prefix} ({number}).png"
                unpaired = split == "Train" and category == "Normal" and k == 0
                mask = None if unpaired else root / split / category / "lung masks" / name
                _save_pair(rng, root / split / category / "images" / name, mask)
    return out


def write_qata_release(out: Path, seed: int = 0) -> Path:
    """QaTa-COV19-v2 under ``<out>/QaTa-COV19-v2``; the Train Set has one extra image without a mask."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    root = out / "QaTa-COV19-v2"
    for part, n in QATA_SIZES.items():
        for k in range(n + (part == "Train Set")):
            name = f"sub-S{int(rng.integers(10000, 99999))}_ses-E{int(rng.integers(10000, 99999))}_run-1.png"
            mask = None if k == n else root / part / "Ground-truths" / f"mask_{name}"
            _save_pair(rng, root / part / "Images" / name, mask)
    return out


SEG_RELEASE_WRITERS: dict[str, Callable[[Path, int], Path]] = {
    "cxlseg": write_cxlseg_release,
    "covidqu_seg": write_covidqu_seg_release,
    "qata": write_qata_release,
}
