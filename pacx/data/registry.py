"""Benchmark registry: one frozen spec per downstream benchmark (docs/datasets.md, one section each).

Datasets, heads, losses, metrics and converters read these specs, so a new benchmark is one entry (plus its
converter and a YAML) and nothing branches on a task name. The registry holds dataset facts only; training
choices live in ``configs/stage3/``. Image paths are ``<image root>/<image_dirs[split]>/<path_column value>``;
the root is the release as the reference arranged it; CheXchoNet ECHO, MedMod and TB deviate and say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

TASKS = ("binary", "multiclass", "multilabel", "segmentation")
# columns: one 0/1 column per label; index: one integer class column (INDEX_COLUMN);
# onehot: one 0/1 column per class, argmax gives the index (ChestX6); mask: segmentation masks.
LABEL_SOURCES = ("columns", "index", "onehot", "mask")
INDEX_COLUMN = "Label"
SPLITS = ("train", "val", "test")
# task -> suffix of its logged metric names (binary ``val/auroc``; multi-output ``val/auroc_macro``)
METRIC_SUFFIX: dict[str, str] = {"binary": "", "multilabel": "_macro", "multiclass": "_macro",
                                 "segmentation": ""}


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    task: str  # binary | multiclass | multilabel | segmentation
    labels: tuple[str, ...]  # model output order; multiclass: class names in index order
    path_column: str
    mask_column: str | None  # segmentation only
    image_dirs: Mapping[str, str]  # split -> subfolder under the image root ("" for none)
    manifest_files: Mapping[str, str]  # split -> CSV file name written by the converter
    metric: str  # the paper metric of the full-data table (docs/datasets.md#benchmarks)
    label_source: str
    description: str
    in_paper: bool  # one of the nine paper benchmarks
    # Documented fill policy for blank / NaN label cells (docs/datasets.md#labels): None (every benchmark
    # here) makes such a cell an error naming its rows; a value fills them with it and logs the count.
    label_fill: int | None = None
    # The metric of the low-data table and figure: the paper reports its 1 % results in AUROC for every
    # classification benchmark (docs/datasets.md#low-data).
    low_data_metric: str = "auroc"
    # Rows per split of the converter's manifests as documented (docs/performance.md#split-sizes); a split the
    # documentation gives no number for is absent. Read only by cost estimates (pacx.reproduce.estimate).
    split_sizes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: task {self.task!r} not in {TASKS}")
        if self.label_source not in LABEL_SOURCES:
            raise ValueError(f"{self.name}: label_source {self.label_source!r} not in {LABEL_SOURCES}")
        if (self.task == "segmentation") != (self.mask_column is not None):
            raise ValueError(f"{self.name}: mask_column is required for segmentation and only there")
        for field_name in ("image_dirs", "manifest_files"):
            mapping = getattr(self, field_name)
            if set(mapping) != set(SPLITS):
                raise ValueError(f"{self.name}: {field_name} must map exactly {SPLITS}, got "
                                 f"{sorted(mapping)}")
            object.__setattr__(self, field_name, MappingProxyType(dict(mapping)))
        if set(self.split_sizes) - set(SPLITS) or any(n < 1 for n in self.split_sizes.values()):
            raise ValueError(f"{self.name}: split_sizes must map splits of {SPLITS} to positive counts")
        object.__setattr__(self, "split_sizes", MappingProxyType(dict(self.split_sizes)))
        if not self.labels:
            raise ValueError(f"{self.name}: no labels")

    def __hash__(self) -> int:  # the mapping fields are unhashable; names are unique
        return hash(self.name)

    @property
    def num_outputs(self) -> int:
        return 1 if self.task in ("binary", "segmentation") else len(self.labels)

    def metric_column(self, metric: str | None = None, split: str = "test") -> str:
        """The logged column of ``metric`` (default: :attr:`metric`) on ``split``, e.g. ``test/f1_macro``."""
        return f"{split}/{metric or self.metric}{METRIC_SUFFIX[self.task]}"

    @property
    def label_columns(self) -> tuple[str, ...]:
        """The manifest columns holding the targets (none for segmentation)."""
        if self.label_source == "mask":
            return ()
        if self.label_source == "index":
            return (INDEX_COLUMN,)
        return self.labels


def _sizes(train: int, val: int, test: int) -> dict[str, int]:
    return {"train": train, "val": val, "test": test}


def _same(subdir: str) -> dict[str, str]:
    return dict.fromkeys(SPLITS, subdir)


def _files(pattern: str) -> dict[str, str]:
    return {s: pattern.format(split=s) for s in SPLITS}


VINDR_LABELS = (
    "Pneumothorax", "Atelectasis", "Mediastinal shift", "Consolidation", "Lung tumor", "ILD", "Calcification",
    "Infiltration", "Other lesion", "Nodule/Mass", "Pneumonia", "Tuberculosis", "Lung Opacity",
    "Pleural effusion", "Pleural thickening", "Pulmonary fibrosis", "Cardiomegaly", "Aortic enlargement",
    "Other diseases",
)
MEDMOD_PHENOTYPES = (
    "Acute and unspecified renal failure", "Acute cerebrovascular disease", "Acute myocardial infarction",
    "Cardiac dysrhythmias", "Chronic kidney disease",
    "Chronic obstructive pulmonary disease and bronchiectasis",
    "Complications of surgical procedures or medical care", "Conduction disorders",
    "Congestive heart failure; nonhypertensive", "Coronary atherosclerosis and other heart disease",
    "Diabetes mellitus with complications", "Diabetes mellitus without complication",
    "Disorders of lipid metabolism", "Essential hypertension", "Fluid and electrolyte disorders",
    "Gastrointestinal hemorrhage", "Hypertension with complications and secondary hypertension",
    "Other liver diseases", "Other lower respiratory disease", "Other upper respiratory disease",
    "Pleurisy; pneumothorax; pulmonary collapse",
    "Pneumonia (except that caused by tuberculosis or sexually transmitted disease)",
    "Respiratory failure; insufficiency; arrest (adult)", "Septicemia (except in labor)", "Shock",
)
MEDMOD_MORTALITY = ("mortality_inunit", "mortality", "mortality_inhospital")
NIH_LABELS = (
    "Hernia", "Pneumothorax", "Nodule", "Edema", "Effusion", "Pleural_Thickening", "Cardiomegaly", "Mass",
    "Fibrosis", "Consolidation", "Pneumonia", "Infiltration", "Emphysema", "Atelectasis",
)
CHESTX6_CLASSES = ("Covid-19", "Emphysema", "Normal",
                   "Pneumonia-Bacterial", "Pneumonia-Viral", "Tuberculosis")
ECHO_LABELS = ("slvh", "dlv", "heart_transplant", "lung_transplant", "pacemaker_or_icd")


def _seg(name: str, label: str, description: str, split_sizes: dict[str, int] | None = None) -> BenchmarkSpec:
    return BenchmarkSpec(
        name=name, task="segmentation", labels=(label,), path_column="img_path", mask_column="mask_path",
        image_dirs=_same(""), manifest_files=_files("{split}.csv"), metric="iou", label_source="mask",
        description=description, in_paper=True, low_data_metric="iou", split_sizes=split_sizes or {},
    )


_SPECS = (
    BenchmarkSpec(
        name="chexchonet", task="binary", labels=("composite_slvh_dlv",), path_column="cxr_filename",
        mask_column=None, image_dirs=_same("images"), manifest_files=_files("chexchonet_{split}.csv"),
        metric="f1", label_source="columns", in_paper=True, split_sizes=_sizes(51543, 5728, 14318),
        description="CheXchoNet composite SLVH/DLV, image-level stratified 80/20 then 90/10 "
                    "(docs/datasets.md#chexchonet)",
    ),
    BenchmarkSpec(
        # Deviation: the reference moves images into train/ val/ test/; we leave them in the flat folder.
        name="chexchonet_echo", task="multilabel", labels=ECHO_LABELS, path_column="cxr_filename",
        mask_column=None, image_dirs=_same("images"), manifest_files=_files("{split}/{split}.csv"),
        metric="auroc", label_source="columns", in_paper=False,
        description="CheXchoNet 5 echo labels, patient-level stratified 80/10/10 "
                    "(docs/datasets.md#chexchonet)",
    ),
    BenchmarkSpec(
        name="vindr", task="multilabel", labels=VINDR_LABELS, path_column="image_id", mask_column=None,
        image_dirs={"train": "train", "val": "train", "test": "test"},
        manifest_files={"train": "vindr_train_split.csv", "val": "vindr_val_split.csv",
                        "test": "vindr_test_split.csv"},
        metric="f1", label_source="columns", in_paper=True, split_sizes=_sizes(13500, 1500, 3000),
        description="VinDr-CXR 19 labels (majority vote), official test, random 90/10 train/val "
                    "(docs/datasets.md#vindr)",
    ),
    BenchmarkSpec(
        # Deviation: cxr_path stays the MIMIC-CXR-JPG relative path (no moving into train/ val/ test/).
        name="medmod_phys", task="multilabel", labels=MEDMOD_PHENOTYPES, path_column="cxr_path",
        mask_column=None, image_dirs=_same(""), manifest_files=_files("{split}/{split}.csv"),
        metric="auroc", label_source="columns", in_paper=True,
        description="MedMod 25 phenotypes, stay-level stratified 70/10/20 (docs/datasets.md#medmod)",
    ),
    BenchmarkSpec(
        name="medmod_mort", task="multilabel", labels=MEDMOD_MORTALITY, path_column="cxr_path",
        mask_column=None, image_dirs=_same(""), manifest_files=_files("{split}/{split}.csv"),
        metric="auroc", label_source="columns", in_paper=False,
        description="MedMod mortality (3 labels), same splits as medmod_phys (docs/datasets.md#medmod)",
    ),
    _seg("cxlseg", "lung", "CXL-Seg MIMIC-CXR lung masks, official split column (docs/datasets.md#cxlseg)"),
    # The official Train/Val/Test folders of the lung segmentation data: every image has its mask, so the
    # manifests hold the folders' counts (the same images as the 3-class entry below).
    _seg("covidqu_seg", "lung", "COVID-QU-Ex lung masks, official Train/Val/Test (docs/datasets.md#covidqu)",
         _sizes(21715, 5417, 6788)),
    BenchmarkSpec(
        name="covidqu", task="multiclass", labels=("Normal", "COVID-19", "Non-COVID"), path_column="Path",
        mask_column=None, image_dirs=_same("images"), manifest_files=_files("covidqu_{split}_split.csv"),
        metric="auroc", label_source="index", in_paper=False, split_sizes=_sizes(21715, 5417, 6788),
        description="COVID-QU-Ex 3-class, official Train/Val/Test (docs/datasets.md#covidqu)",
    ),
    BenchmarkSpec(
        # Image root = the Kaggle download (the reference's root was its images/ child).
        name="tb", task="binary", labels=("Label",), path_column="Path", mask_column=None,
        image_dirs=_same("images/images"), manifest_files=_files("tb_{split}_split.csv"),
        metric="auroc", label_source="columns", in_paper=True,
        split_sizes=_sizes(449, 80, 133),
        description="Shenzhen TB, stratified 80/20 then 85/15 (docs/datasets.md#tb)",
    ),
    BenchmarkSpec(
        name="chestx6", task="multiclass", labels=CHESTX6_CLASSES, path_column="Path", mask_column=None,
        image_dirs=_same(""), manifest_files=_files("chestx6_{split}_split.csv"),
        metric="auroc", label_source="onehot", in_paper=True, split_sizes=_sizes(14551, 1748, 1737),
        description="Chest X-Ray 6 classes, official train/val/test (docs/datasets.md#chestx6)",
    ),
    BenchmarkSpec(
        name="nih", task="multilabel", labels=NIH_LABELS, path_column="Image Index", mask_column=None,
        image_dirs=_same("images"), manifest_files=_files("nih_{split}_split.csv"),
        metric="auroc", label_source="columns", in_paper=True, split_sizes=_sizes(73545, 12979, 25596),
        description="NIH ChestX-ray14, official test list, random 85/15 train/val (docs/datasets.md#nih)",
    ),
    _seg("qata", "infection",
         "QaTa-COV19 v2 infection masks, official test, random 90/10 train/val (docs/datasets.md#qata)"),
    BenchmarkSpec(
        name="covidx", task="binary", labels=("Label",), path_column="Path", mask_column=None,
        image_dirs=_same("images"), manifest_files=_files("covid_{split}_split.csv"),
        metric="auroc", label_source="columns", in_paper=False, split_sizes=_sizes(61068, 6786, 16964),
        description="COVIDx CXR-2 (v9), pooled and re-split stratified 80/20 then 90/10 "
                    "(docs/datasets.md#extra-benchmarks)",
    ),
    BenchmarkSpec(
        name="pneumonia", task="binary", labels=("Pneumonia",), path_column="Path", mask_column=None,
        image_dirs=_same("images"), manifest_files=_files("pneumonia_{split}_split.csv"),
        metric="auroc", label_source="columns", in_paper=False,
        split_sizes=_sizes(4216, 469, 1172),
        description="Pediatric pneumonia (Kermany), pooled and re-split stratified 80/20 then 90/10 "
                    "(docs/datasets.md#extra-benchmarks)",
    ),
)

BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in _SPECS}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Add a benchmark to ``BENCHMARKS``; a name is registered once (docs/architecture.md#add-a-benchmark)."""
    if spec.name != spec.name.lower():
        raise ValueError(f"benchmark name {spec.name!r} must be lowercase")
    if spec.name in BENCHMARKS:
        raise KeyError(f"benchmark {spec.name!r} registered twice")
    BENCHMARKS[spec.name] = spec
    return spec


def get_benchmark(name: str) -> BenchmarkSpec:
    try:
        return BENCHMARKS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}") from None
