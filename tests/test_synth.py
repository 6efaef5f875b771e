import csv
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from meddx import MeddxError
from meddx.synth import SynthConfig, labels_for, render, write_archive


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
    from meddx.storage import filesystem

    rows = write_archive(SynthConfig(out=f"{bucket}/syn", n=5, size=64, storage=settings))
    fs = filesystem(bucket, settings)
    keys = sorted(fs.find(bucket.removeprefix("s3://") + "/syn"))
    assert len(keys) == 6 and keys[0].endswith("/syn/_manifest.csv")
    manifest = fs.cat_file(bucket.removeprefix("s3://") + "/syn/_manifest.csv").decode()
    assert [r["uri"] for r in csv.DictReader(io.StringIO(manifest))] == [u for u, _ in rows]
    assert all(u.startswith(f"{bucket}/syn/") for u, _ in rows)
