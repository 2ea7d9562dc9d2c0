"""Named constants shared across the package (one definition each)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Frozen teacher embedding widths (docs/method.md#stage-2): ECGFounder features and Labs DAE latent.
ECG_EMBED_DIM = 1024
LABS_EMBED_DIM = 256

# ECG lead orders. MIMIC-IV-ECG (and so Symile-MIMIC) stores aVF before aVL; ECGFounder expects the
# standard order (docs/ecgfounder.md#preprocessing).
STANDARD_LEAD_ORDER: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF",
                                        "V1", "V2", "V3", "V4", "V5", "V6")
MIMIC_LEAD_ORDER: tuple[str, ...] = ("I", "II", "III", "aVR", "aVF", "aVL",
                                     "V1", "V2", "V3", "V4", "V5", "V6")

# Documented split sizes of the Stage 1 and Stage 2 data (docs/performance.md#split-sizes):
# CheXpert-v1.0-small, all views (docs/datasets.md#chexpert); Symile-MIMIC's official splits
# (docs/datasets.md#symile). Read by cost estimates.
CHEXPERT_SPLIT_SIZES: dict[str, int] = {"train": 223_414, "val": 234}
SYMILE_SPLIT_SIZES: dict[str, int] = {"train": 10_000, "val": 750}

# The paper's Stage 1 mask ratio (docs/method.md#stage-1) and Stage 2 LoRA (docs/method.md#stage-2): the one
# code default of every layer that takes them (model, tuning, LightningModule). The paper configs set them for
# a run.
MAE_MASK_RATIO = 0.9
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.1
LORA_TARGETS: tuple[str, ...] = ("qkv", "fc1", "fc2")

# Stage names recorded in checkpoints, run.json and export metadata.
STAGE_MAE = "stage1_mae"
STAGE_PACX = "stage2_pacx"
