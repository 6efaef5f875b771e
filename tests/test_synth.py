import csv
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from meddx import MeddxError
from meddx.config import SynthConfig
from meddx.synthetic.chest import (
    FINDINGS,
    finding_labels,
    labels_for,
    parse_prevalences,
    render,
    write_archive,
)


def digest_tree(root):
    """Hashes of every file; the manifest with its (absolute) root made relative."""
    return {
        str(p.relative_to(root)): hashlib.sha256(
            p.read_bytes().replace(str(root).encode(), b"ROOT")
        ).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_manifest_and_labels(tmp_path):
    rows = write_archive(SynthConfig(out=str(tmp_path), n=12, size=96, positive_rate=0.25))
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert len(files) == 12
    assert {f.split("/")[0] for f in files} == {"normal", "opacity"}
    assert sum(f.startswith("opacity/") for f in files) == 3
    with open(tmp_path / "_manifest.csv") as fh:
        manifest = list(csv.DictReader(fh))
    assert [r["uri"] for r in manifest] == [u for u, _ in rows]
    for row in manifest:
        assert row["uri"].startswith(str(tmp_path))
        assert f"/{row['label']}/" in row["uri"]
        img = Image.open(row["uri"])
        assert img.mode == "L" and img.size == (96, 96)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_archive(SynthConfig(out=str(tmp_path / name), n=6, size=64, seed=seed))
    assert digest_tree(tmp_path / "a") == digest_tree(tmp_path / "b")
    assert digest_tree(tmp_path / "a") != digest_tree(tmp_path / "c")


def test_jpeg_format(tmp_path):
    write_archive(SynthConfig(out=str(tmp_path), n=4, size=64, format="jpeg"))
    jpgs = list(tmp_path.rglob("*.jpg"))
    assert len(jpgs) == 4
    assert all(p.read_bytes()[:3] == b"\xff\xd8\xff" for p in jpgs)


def test_opacity_is_subtle_and_inside_a_lung_field():
    size = 128
    for index in range(6):
        normal = render(index, positive=False, size=size, seed=3).astype(int)
        finding = render(index, positive=True, size=size, seed=3).astype(int)
        diff = finding - normal
        changed = np.abs(diff) > 6
        # A patch, not a marker pixel, and not the whole film.
        assert 0.005 < changed.mean() < 0.15, changed.mean()
        # Denser (brighter) than the lung it sits in, but a haze, not a white marker.
        assert diff.max() < 115  # under 45% of the grey range
        assert diff.sum() > 0
        # Inside a lung field: darker than the body on average, and off the midline.
        assert normal[changed].mean() < 0.85 * normal[normal > 40].mean()
        assert abs(np.nonzero(changed)[1].mean() - size / 2) > 0.1 * size


def test_radiograph_structure():
    img = render(0, positive=False, size=128, seed=0).astype(float)
    corners = np.concatenate([img[:8, :8].ravel(), img[:8, -8:].ravel()])
    centre_band = img[40:80, 60:68]  # mediastinum / spine
    lungs = np.concatenate([img[40:70, 25:45].ravel(), img[40:70, 85:105].ravel()])
    assert corners.mean() < lungs.mean() < centre_band.mean()


def test_labels_are_exact_and_shuffled():
    labels = labels_for(100, 0.3, seed=0)
    assert labels.count("opacity") == 30
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n": 0}, "--n"), ({"positive_rate": 1.5}, "--positive-rate"), ({"format": "gif"}, "gif")],
)
def test_bad_config(tmp_path, kwargs, message):
    with pytest.raises(MeddxError, match=message):
        write_archive(SynthConfig(out=str(tmp_path), **{"n": 2, **kwargs}))


def test_write_to_s3(bucket, settings):
    from meddx.inputs.storage import filesystem

    rows = write_archive(SynthConfig(out=f"{bucket}/syn", n=5, size=64, storage=settings))
    fs = filesystem(bucket, settings)
    keys = sorted(fs.find(bucket.removeprefix("s3://") + "/syn"))
    assert len(keys) == 6 and keys[0].endswith("/syn/_manifest.csv")
    manifest = fs.cat_file(bucket.removeprefix("s3://") + "/syn/_manifest.csv").decode()
    assert [r["uri"] for r in csv.DictReader(io.StringIO(manifest))] == [u for u, _ in rows]
    assert all(u.startswith(f"{bucket}/syn/") for u, _ in rows)


def test_single_label_manifest_has_no_finding_columns(tmp_path):
    write_archive(SynthConfig(out=str(tmp_path), n=3, size=64))
    assert (tmp_path / "_manifest.csv").read_text().splitlines()[0] == "uri,label"


def test_findings_manifest_columns_and_co_occurrence(tmp_path):
    findings = (("opacity", 0.5), ("effusion", 0.4), ("nodule", 0.3))
    rows = write_archive(SynthConfig(out=str(tmp_path), n=20, size=64, findings=findings))
    with open(tmp_path / "_manifest.csv") as fh:
        manifest = list(csv.DictReader(fh))
    assert list(manifest[0]) == ["uri", "label", "opacity", "effusion", "nodule"]
    assert [r["uri"] for r in manifest] == [u for u, _ in rows]
    truth = np.array([[int(r[f]) for f, _ in findings] for r in manifest])
    assert set(truth.ravel()) == {0, 1}
    # Each finding at its own exact prevalence, and drawn independently: films with
    # several findings and films with none.
    assert truth.sum(axis=0).tolist() == [10, 8, 6]
    assert (truth.sum(axis=1) >= 2).any() and (truth.sum(axis=1) == 0).any()
    for row, flags in zip(manifest, truth, strict=True):
        folder = "abnormal" if flags.any() else "normal"
        assert row["label"] == folder and f"/{folder}/" in row["uri"]
    assert len(list(tmp_path.rglob("*.png"))) == 20


def test_findings_fall_independently():
    truth = finding_labels(2000, tuple(FINDINGS.items()), seed=0)
    rates = truth.mean(axis=0)
    np.testing.assert_allclose(rates, list(FINDINGS.values()), atol=1e-3)
    # P(opacity and nodule) is close to the product of the prevalences.
    both = (truth[:, 0] & truth[:, 2]).mean()
    assert both == pytest.approx(rates[0] * rates[2], abs=0.02)


def finding_diff(index, finding, size=128, seed=3):
    normal = render(index, size=size, seed=seed).astype(int)
    return normal, render(index, size=size, seed=seed, findings=(finding,)).astype(int) - normal


def test_effusion_blunts_a_lateral_costophrenic_angle():
    size, darkness = 128, []
    for index in range(8):
        normal, diff = finding_diff(index, "effusion", size)
        changed = diff > 6
        assert 0.002 < changed.mean() < 0.05, changed.mean()
        ys, xs = np.nonzero(changed)
        # At a lung base (lower half of the film), off the midline, and rising towards
        # the lateral chest wall: the outer columns reach higher than the inner ones.
        assert ys.mean() > 0.55 * size and np.abs(xs - size / 2).min() > 0.05 * size
        lateral = np.abs(xs - size / 2)
        outer, inner = lateral >= np.median(lateral), lateral < np.median(lateral)
        assert ys[outer].min() < ys[inner].min()
        # Its core fills dark lung (the angle lies on the lung's edge, so only a little
        # darker in some films than the body's mean; never brighter).
        core = diff > 0.6 * diff.max()
        darkness.append(normal[core].mean() / normal[normal > 40].mean())
    assert max(darkness) < 1.0 and np.mean(darkness) < 0.9, darkness


def test_nodule_is_small_round_and_in_a_lung_field():
    size = 128
    for index in range(6):
        normal, diff = finding_diff(index, "nodule", size)
        changed = diff > 12
        ys, xs = np.nonzero(changed)
        assert 0.0005 < changed.mean() < 0.01, changed.mean()
        # Round: as tall as it is wide, and filling most of its bounding box's circle.
        height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert abs(height - width) <= 2
        assert changed.sum() > 0.6 * np.pi * (min(height, width) / 2) ** 2
        assert normal[changed].mean() < 0.85 * normal[normal > 40].mean()


def test_findings_add_up_and_single_label_is_unchanged():
    plain = render(1, positive=True, size=96, seed=4)
    np.testing.assert_array_equal(plain, render(1, findings=("opacity",), size=96, seed=4))
    every = render(1, findings=tuple(FINDINGS), size=96, seed=4).astype(int)
    for finding in FINDINGS:  # each finding's change is still there with the others
        alone = render(1, findings=(finding,), size=96, seed=4).astype(int)
        base = render(1, size=96, seed=4).astype(int)
        mask = (alone - base) > 12
        assert (every[mask] - base[mask]).mean() > 8, finding


def test_parse_prevalences():
    assert parse_prevalences("opacity, nodule=0.1") == (("opacity", 0.3), ("nodule", 0.1))
    assert parse_prevalences("all") == tuple(FINDINGS.items())
    for bad, message in (
        ("bogus", "unknown finding"),
        ("nodule,nodule", "distinct"),
        ("", "one or more distinct findings"),
    ):
        with pytest.raises(MeddxError, match=message):
            parse_prevalences(bad)
    with pytest.raises(MeddxError, match="prevalences"):
        write_archive(SynthConfig(out="/nonexistent", n=2, findings=(("nodule", 1.5),)))
