"""The physiology phantom (``pacx.demo.phantom``): the latent shows where it should, the anatomy is
drawn as the masks say, bones carry the lung fields' pixel variance, and every release is in its real
layout (our converters and the Symile validation read it), deterministic and patient-disjoint.

Measurements are taken from what was written or rendered (pixels, ECG samples, lab percentiles), never
from the generator's own geometry numbers. Measured values are printed (``pytest -s``).
"""

from __future__ import annotations

import hashlib
import io
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pacx.data.prepare import run_converter
from pacx.data.registry import SPLITS, get_benchmark
from pacx.data.symile import SymileMIMICDataModule
from pacx.data.symile_files import ECG_SAMPLING_HZ, validate_split
from pacx.demo.phantom import (
    LATENT_NAMES,
    PRESETS,
    generate_phantom,
    render_cxr,
    sample_cxr_params,
    sample_latent,
)
from pacx.demo.phantom.__main__ import main as phantom_cli
from pacx.demo.phantom.cxr import fluid_signs

SEED = 0
ADMISSION_SPLITS = ("train", "val", "test")  # each split's leading rows are its admissions
CLEAN = ("bones", "devices", "texture", "finding", "physiology", "anatomy.hila", "noise")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return generate_phantom(tmp_path_factory.mktemp("phantom") / "a", seed=SEED, sizes="quick", workers=1)


def truth(paths, release: str) -> pd.DataFrame:
    return pd.read_csv(paths["truth"] / f"{release}.csv")


# ------------------------------------------------------------------------------------------ measurements


def ecg_features(ecg: np.ndarray) -> np.ndarray:
    """Simple summaries of stored ECGs [N, 5000, 12] -> [N, 25]: heart rate from the autocorrelation of
    the QRS energy, and per lead the robust range and standard deviation (after the median)."""
    x = ecg - np.median(ecg, axis=1, keepdims=True)
    energy = np.abs(np.diff(x, axis=1)).sum(axis=-1)  # [N, T - 1]
    energy -= energy.mean(axis=1, keepdims=True)
    spec = np.fft.rfft(energy, n=2 * energy.shape[1])
    acf = np.fft.irfft(spec * np.conj(spec))[:, : energy.shape[1]]  # [N, T - 1]
    lo, hi = int(0.35 * ECG_SAMPLING_HZ), int(1.6 * ECG_SAMPLING_HZ)  # 171 to 38 bpm
    rate = 60.0 * ECG_SAMPLING_HZ / (lo + np.argmax(acf[:, lo:hi], axis=1))
    spread = np.percentile(x, 99, axis=1) - np.percentile(x, 1, axis=1)  # [N, 12]
    return np.column_stack([rate, spread, x.std(axis=1)])


def probe_r2(features: np.ndarray, target: np.ndarray) -> float:
    """Held-out R² of a ridge probe (5-fold cross-validated predictions)."""
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    with threadpool_limits(1):  # tiny problem: BLAS threads only contend
        pred = cross_val_predict(model, features, target, cv=KFold(5, shuffle=True, random_state=0))
    return float(1 - ((target - pred) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def otsu3(values: np.ndarray, bins: int = 48) -> float:
    """Lower threshold of a three-class Otsu split (lungs | chest wall | heart, abdomen and bone)."""
    hist, edges = np.histogram(values, bins=bins)
    p = hist / hist.sum()
    w = np.concatenate([[0.0], np.cumsum(p)])
    m = np.concatenate([[0.0], np.cumsum(p * (edges[:-1] + edges[1:]) / 2)])
    best, arg = -1.0, 1
    for i in range(1, bins - 1):
        for j in range(i + 1, bins):
            ws, ms = (w[i], w[j] - w[i], 1 - w[j]), (m[i], m[j] - m[i], m[-1] - m[j])
            if min(ws) > 0 and (v := sum(a * a / b for a, b in zip(ms, ws))) > best:
                best, arg = v, i
    return float(edges[arg])


def otsu2(values: np.ndarray, bins: int = 64) -> float:
    """Two-class Otsu threshold."""
    hist, edges = np.histogram(values.astype(float), bins=bins)
    p, mids = hist / hist.sum(), (edges[:-1] + edges[1:]) / 2
    w, mu = np.cumsum(p), np.cumsum(p * mids)
    between = (mu[-1] * w - mu) ** 2 / (w * (1 - w) + 1e-12)
    return float(edges[np.argmax(between) + 1])


def walk(profile: np.ndarray, start: int, step: int, below: bool, thr: float) -> int:
    """First index from ``start`` (moving by ``step``) whose value is (not) below ``thr``."""
    i = start
    while 0 <= i < len(profile) and (profile[i] < thr) != below:
        i += step
    return i


def cardiothoracic(img: np.ndarray) -> tuple[float, float]:
    """(cardiac width, thoracic width) in pixels of one radiograph, NaN if its lungs are not found.

    Rows are averaged over about a rib period (the ribs cancel); the dark class of a 3-class Otsu split
    is lung. The midline is the brightest column of the upper chest. The image-left lung is the largest
    dark region left of it that does not touch the border; the cardiac width is the bright run around
    the midline in the row band 70-90 % down that lung (the heart's widest part), the thoracic width the
    widest distance between the lungs' outer borders.
    """
    s = img.shape[0]
    x = ndimage.uniform_filter(img.astype(float), size=(max(3, s // 12), max(1, s // 32)))
    thr = otsu3(x[int(0.2 * s):int(0.9 * s), int(0.15 * s):int(0.85 * s)])
    lo, hi = int(0.3 * s), int(0.7 * s)
    mid = lo + int(np.argmax(x[int(0.15 * s):int(0.45 * s), lo:hi].mean(axis=0)))
    labels, n = ndimage.label(x < thr)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    sizes = ndimage.sum(labels[:, :mid] > 0, labels[:, :mid], range(1, n + 1))
    inner = [k + 1 for k in np.argsort(sizes)[::-1] if k + 1 not in border and sizes[k] > 0]
    if not inner:
        return np.nan, np.nan
    rows = np.flatnonzero((labels == inner[0]).any(axis=1))
    top, bottom = rows.min(), rows.max()
    profile = x[top + int(0.7 * (bottom - top)):top + int(0.9 * (bottom - top)) + 1].mean(axis=0)
    cardiac = sum(abs(walk(profile, mid, step, True, thr) - mid) for step in (-1, 1))
    thorax = 0
    for r in range(int(0.15 * s), int(0.8 * s)):
        ends = []
        for step in (-1, 1):
            i = walk(x[r], mid, step, True, thr)  # the mediastinum, to the lung
            j = walk(x[r], i, step, False, thr)  # across the lung, to the chest wall
            ends.append(j if 0 <= j < s and abs(j - i) >= s / 30 else None)
        if None not in ends:
            thorax = max(thorax, ends[1] - ends[0] - 1)
    return float(cardiac), float(thorax) if thorax else np.nan


# ------------------------------------------------------------------------------------------ physiology


def test_latent_recoverable_from_ecg_and_labs(phantom):
    """A linear probe on the written ECG summaries and lab percentiles recovers the latent."""
    root, t = phantom["symile"], truth(phantom, "symile")
    counts = t["split"].value_counts()
    ecg = np.concatenate([np.load(root / s / f"ecg_{s}.npy", mmap_mode="r")[:counts[s], 0]
                          for s in ADMISSION_SPLITS])
    labs = np.concatenate([
        np.hstack([np.load(root / s / f"labs_percentiles_{s}.npy")[:counts[s]],
                   np.load(root / s / f"labs_missingness_{s}.npy")[:counts[s]]]) for s in ADMISSION_SPLITS])
    assert np.array_equal(np.concatenate([np.load(root / s / f"hadm_id_{s}.npy")[:counts[s]]
                                          for s in ADMISSION_SPLITS]), t["hadm_id"].to_numpy())
    feats = {"ecg": ecg_features(ecg), "labs": labs}
    feats["both"] = np.hstack([feats["ecg"], feats["labs"]])
    r2 = {(src, name): probe_r2(f, t[name].to_numpy()) for src, f in feats.items() for name in LATENT_NAMES}
    print("\nprobe R² (ecg / labs / both):",
          {n: tuple(round(r2[s, n], 2) for s in feats) for n in LATENT_NAMES})
    rate_bpm = feats["ecg"][:, 0]
    assert np.corrcoef(rate_bpm, t["heart_rate"])[0, 1] > 0.8
    for name in ("cardiac_size", "heart_rate", "renal"):
        assert r2["both", name] > 0.3, (name, r2["both", name])
    assert all(r2["both", n] > 0.1 for n in LATENT_NAMES), r2


def test_silhouette_width_tracks_cardiac_size(phantom):
    """Cardiothoracic ratio measured on the written CheXchoNet JPEGs rises with the cardiac latent."""
    t = truth(phantom, "chexchonet")
    images = [np.asarray(Image.open(phantom["chexchonet"] / "images" / f)) for f in t["cxr_filename"]]
    measured = np.array([cardiothoracic(img) for img in images])
    ok = ~np.isnan(measured).any(axis=1)
    ctr = measured[ok, 0] / measured[ok, 1]
    rho = spearmanr(ctr, t["cardiac_size"][ok])[0]
    print(f"\nCTR vs cardiac_size: Spearman {rho:.3f}, Pearson "
          f"{np.corrcoef(ctr, t['cardiac_size'][ok])[0, 1]:.3f} ({ok.sum()} of {len(ok)} measured)")
    assert ok.mean() > 0.95
    assert rho > 0.7
    # the measurement finds the drawn heart
    assert spearmanr(measured[ok, 0], t["silhouette_px"][ok])[0] > 0.7


def test_fluid_shows_as_basal_haze():
    """Same images with only ``fluid`` changed: the lung bases brighten with it, but faintly."""
    rng = np.random.default_rng(1)
    params = sample_cxr_params(rng, np.zeros((16, len(LATENT_NAMES))))
    means = []
    for fluid in (-2.0, 0.0, 2.0):
        p = {**params, "fluid": np.full(16, fluid)}
        p["haze"], p["effusion"] = fluid_signs(p["fluid"])
        batch = render_cxr(p, 64, exclude=("noise",))
        lower = batch.lungs.astype(bool) & (np.arange(64)[None, :, None] > 36)
        means.append(batch.images[lower].mean())
    assert means[0] < means[1] < means[2]
    assert means[2] - means[0] < 25  # subtle: well under a tenth of the grey range


# ------------------------------------------------------------------------------------------ anatomy


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_masks_match_drawn_lungs(phantom):
    """Masks are binary, darker inside than around, and match the dark region of a clean render."""
    rng = np.random.default_rng(2)
    params = sample_cxr_params(rng, sample_latent(rng, 48), nodule=0.3)
    full, clean = render_cxr(params, 64), render_cxr(params, 64, exclude=CLEAN)
    assert set(np.unique(full.lungs)) <= {0, 1}
    ious = []
    for img, mask in zip(clean.images, full.lungs.astype(bool)):
        # Otsu threshold over the chest (the mask's dilated box), then the dark regions that do not touch
        # the image border (air around the body and the trachea do).
        rows, cols = np.nonzero(ndimage.binary_dilation(mask, iterations=3))
        labels, _ = ndimage.label(img < otsu2(img[rows.min():rows.max() + 1, cols.min():cols.max() + 1]))
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        ious.append(iou(mask, (labels > 0) & ~np.isin(labels, border)))
    print(f"\nmask vs clean-render IoU: min {min(ious):.3f}, mean {np.mean(ious):.3f}")
    assert min(ious) >= 0.9

    # The written COVID-QU-Ex masks: 0/255, sized as their image, lungs darker than a ring around them.
    root = phantom["covidqu_seg"] / "Lung Segmentation Data" / "Lung Segmentation Data"
    for rel in truth(phantom, "covidqu_seg")["img_path"]:
        img = np.asarray(Image.open(root / rel)).astype(float)
        mask = np.asarray(Image.open(root / rel.replace("/images/", "/lung masks/")))
        assert mask.shape == img.shape and set(np.unique(mask)) <= {0, 255}
        lung = mask > 0
        ring = ndimage.binary_dilation(lung, iterations=2) & ~lung
        assert img[lung].mean() < img[ring].mean() - 10, rel


def test_bones_dominate_lung_field_variance():
    """Removing the bones removes most of the pixel variance inside the lung fields, far more than the
    physiology accounts for; the whole-image share is reported too."""
    rng = np.random.default_rng(3)
    n = 96
    params = sample_cxr_params(rng, sample_latent(rng, n), nodule=0.1)
    full = render_cxr(params, 64)
    no_bones = render_cxr(params, 64, exclude=("bones",)).images.astype(float)
    flat = {**params, "cardiac_size": np.zeros(n), "fluid": np.zeros(n)}
    flat["haze"], flat["effusion"] = fluid_signs(flat["fluid"])
    no_physiology = render_cxr(flat, 64).images.astype(float)
    img, lung = full.images.astype(float), full.lungs.astype(bool)

    def in_lungs(x: np.ndarray) -> float:  # spatial variance over the lung pixels, averaged over images
        return float(np.mean([x[i][lung[i]].var() for i in range(n)]))

    def across(x: np.ndarray) -> float:  # variance across images, averaged over pixels
        return float(x.var(axis=0).mean())

    share = {k: f(d) / f(img) for k, f, d in (
        ("bones_lungs", in_lungs, img - no_bones), ("rest_lungs", in_lungs, no_bones),
        ("physiology_lungs", in_lungs, img - no_physiology),
        ("bones_image", across, img - no_bones), ("rest_image", across, no_bones),
        ("physiology_image", across, img - no_physiology))}
    print("\nvariance shares:", {k: round(v, 3) for k, v in share.items()})
    assert share["bones_lungs"] > 0.6 and share["rest_lungs"] < share["bones_lungs"]
    assert share["bones_image"] > 5 * share["physiology_image"]
    assert share["physiology_lungs"] < 0.1


# ------------------------------------------------------------------------------------------ layouts


def test_releases_pass_the_converters(phantom, tmp_path):
    """Every Stage 1 / Stage 3 release converts; labels and rows agree with the truth tables."""
    summary = run_converter("chexpert", phantom["chexpert"], tmp_path / "chexpert")
    assert summary["train"]["rows"] + summary["val"]["rows"] == len(truth(phantom, "chexpert"))

    for name, key, label, truth_label in (("chexchonet", "cxr_filename", "composite_slvh_dlv",
                                           "composite_slvh_dlv"),
                                          ("chexchonet_echo", "cxr_filename", "composite_slvh_dlv",
                                           "composite_slvh_dlv"),
                                          ("tb", "Path", "Label", "nodule")):
        spec = get_benchmark(name)
        run_converter(name, phantom[name.split("_")[0]], tmp_path / name)
        frames = pd.concat([pd.read_csv(tmp_path / name / spec.manifest_files[s]) for s in SPLITS])
        t = truth(phantom, name.split("_")[0])
        t = t.set_index("study_id" if name == "tb" else key)[truth_label]
        assert len(frames) == len(t) and frames[key].is_unique
        assert (frames.set_index(key)[label] == t.loc[frames[key]]).all()
        image_dir = phantom[name.split("_")[0]] / spec.image_dirs["train"]
        assert all((image_dir / p).is_file() for p in frames[key])
    echo = pd.read_csv(tmp_path / "chexchonet_echo" / "train" / "train.csv")
    assert {"ivsd", "lvpwd", "lvidd", "pacemaker_or_icd"} <= set(echo.columns)

    summary = run_converter("covidqu_seg", phantom["covidqu_seg"], tmp_path / "seg")
    assert summary["images_without_mask"]["count"] == 0
    assert [summary[s]["rows"] for s in SPLITS] == list(PRESETS["quick"].covidqu_seg)


def test_symile_release_validates(phantom):
    """All splits pass the release validation; the data module serves phantom rows; labs look like Symile."""
    root = phantom["symile"]
    for split in ("train", "val", "val_retrieval", "test"):
        for item in ("cxr", "ecg", "labs"):
            validate_split(root, split, item)
    validate_split(root, "test_uni", "cxr")
    dm = SymileMIMICDataModule(str(root), item="cxr_raw_teachers", batch_size=4, num_workers=0, img_size=64,
                               train_transform="resize", pin_memory=False)
    dm.setup("fit")
    item = dm.datasets["train"][0]
    assert tuple(item["cxr"].shape) == (3, 64, 64) and tuple(item["raw"]["ecg"][0].shape) == (1, 5000, 12)
    observed = np.load(root / "train" / "labs_missingness_train.npy")
    pct = np.load(root / "train" / "labs_percentiles_train.npy")
    assert 0.6 < observed.mean() < 0.8  # Symile: ~70 % observed
    assert abs(pct[observed == 1].mean() - 0.5) < 0.05  # percentiles of the train ECDF


# ------------------------------------------------------------------------------------------ determinism


def file_digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "phantom.json"}


def test_deterministic_for_a_seed_and_cli(phantom, tmp_path):
    """The CLI (two worker processes) writes the same bytes for the same seed; another seed differs."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert phantom_cli(["--out", str(tmp_path / "b"), "--quick", "--seed", str(SEED)]) == 0
    printed = dict(line.split("\t") for line in out.getvalue().splitlines())
    assert set(printed) == set(phantom) and printed["symile"] == str(tmp_path / "b" / "symile" / "data_npy")
    root = phantom["summary"].parent
    assert file_digests(root) == file_digests(tmp_path / "b")
    other = generate_phantom(tmp_path / "c", seed=SEED + 1, sizes="quick", workers=1)
    assert not np.array_equal(np.load(phantom["symile"] / "train" / "ecg_train.npy", mmap_mode="r")[0],
                              np.load(other["symile"] / "train" / "ecg_train.npy", mmap_mode="r")[0])


def test_patients_disjoint_across_releases(phantom):
    """No patient id, latent or image is shared between releases (hence between stages)."""
    tables = {name: truth(phantom, name)
              for name in ("chexpert", "symile", "chexchonet", "covidqu_seg", "tb")}
    ids = [set(t["phantom_patient"]) for t in tables.values()]
    assert sum(map(len, ids)) == len(set().union(*ids))
    latents = [{tuple(np.round(r, 9)) for r in t[list(LATENT_NAMES)].to_numpy()} for t in tables.values()]
    assert sum(map(len, latents)) == len(set().union(*latents))

    def pixels(paths) -> set[str]:
        return {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in paths}

    sets = [pixels(phantom["chexpert"].rglob("*.jpg")),
            pixels((phantom["chexchonet"] / "images").glob("*.jpg")),
            pixels(phantom["covidqu_seg"].rglob("images/*.png")), pixels(phantom["tb"].rglob("*.png"))]
    assert sum(map(len, sets)) == len(set().union(*sets))


def test_presets_registry():
    assert set(PRESETS) >= {"full", "quick"}
    with pytest.raises(KeyError, match="unknown phantom preset"):
        generate_phantom("unused", sizes="huge")
