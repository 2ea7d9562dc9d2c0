"""Writer of a CheXpert-v1.0-small release in its real layout (docs/datasets.md#chexpert), for tests,
benchmarks and the demo.

``train.csv`` / ``valid.csv`` (``Path, Sex, Age, Frontal/Lateral, AP/PA``, then the 14 observations in release
order) and ``train|valid/patientNNNNN/studyN/viewN_frontal.jpg``. Train labels take 1.0 / 0.0 / -1.0 / empty,
valid labels 1.0 / 0.0; the pixels come from ``image_fn``. With ``visualchexbert`` also Stanford's separately
downloaded ``train_visualCheXbert.csv`` (paths under the full-size ``CheXpert-v1.0/`` folder, the observations
in visualCheXbert order, labels 0 / 1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pacx.testing.images import simple_cxr

RELEASE_NAME = "CheXpert-v1.0-small"
VISUALCHEXBERT_RELEASE_NAME = "CheXpert-v1.0"  # the full-size release the visualCheXbert file describes
RELEASE_META_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
# Label order of the release's train.csv / valid.csv.
RELEASE_LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]

# Label order of train_visualCheXbert.csv (docs/datasets.md#chexpert).
VISUALCHEXBERT_LABELS = [*RELEASE_LABELS[1:], RELEASE_LABELS[0]]

# image_fn(rng, width, height, frontal) -> uint8 [height, width]
ImageFn = Callable[..., np.ndarray]


def write_chexpert_release(
    out: str | Path,
    n_train: int = 64,
    n_valid: int = 16,
    seed: int = 0,
    width: int = 390,
    height: int = 320,
    lateral_fraction: float = 0.15,
    image_fn: ImageFn = simple_cxr,
    jpeg_quality: int = 90,
    visualchexbert: bool = False,
) -> Path:
    """Write ``n_train`` / ``n_valid`` images with their CSVs under ``out``; returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for split, n, first_patient, uncertain in (("train", n_train, 1, True), ("valid", n_valid, 64541, False)):
        rows = []
        patient, study, view = first_patient, 1, 1
        for _ in range(n):
            frontal = rng.random() >= lateral_fraction
            rel = (f"{split}/patient{patient:05d}/study{study}/"
                   f"view{view}_{'frontal' if frontal else 'lateral'}.jpg")
            img = image_fn(rng, width, height, frontal)
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(path, quality=jpeg_quality)
            label_values = [1.0, 0.0, -1.0, np.nan] if uncertain else [1.0, 0.0]
            rows.append(
                {
                    "Path": f"{RELEASE_NAME}/{rel}",
                    "Sex": rng.choice(["Male", "Female"]),
                    "Age": int(rng.integers(18, 90)),
                    "Frontal/Lateral": "Frontal" if frontal else "Lateral",
                    "AP/PA": rng.choice(["AP", "PA"]) if frontal else np.nan,
                    **{k: rng.choice(label_values, p=None) for k in RELEASE_LABELS},
                }
            )
            # Two views per study, one to three studies per patient, as in the release.
            view += 1
            if view > 2 or rng.random() < 0.5:
                view, study = 1, study + 1
                if study > 3 or rng.random() < 0.5:
                    study, patient = 1, patient + 1
        pd.DataFrame(rows, columns=RELEASE_META_COLUMNS + RELEASE_LABELS).to_csv(out / f"{split}.csv",
                                                                                 index=False)
        if split == "train" and visualchexbert:
            visual = pd.DataFrame(rows)[RELEASE_META_COLUMNS]
            visual["Path"] = visual["Path"].str.replace(RELEASE_NAME, VISUALCHEXBERT_RELEASE_NAME, n=1,
                                                        regex=False)
            labels_rng = np.random.default_rng([seed, 1])  # the valid split stays as without the file
            for label in VISUALCHEXBERT_LABELS:
                visual[label] = labels_rng.integers(0, 2, len(visual)).astype(float)
            visual.to_csv(out / "train_visualCheXbert.csv", index=False)
    return out
