"""The bench's synthetic archive: rendered once with ``meddx synth``'s writer and cached
(benchmarks/.cache), larger ones made of hard links to it, and manifests of its first
films."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from record import log

from meddx.config import SynthConfig
from meddx.inputs.shards import IMAGE_SUFFIXES
from meddx.names import parse_film_size
from meddx.synthetic.chest import film_format, write_archive

SEED = 11


def synth_config(folder: Path, n: int, size: str, mix: bool) -> SynthConfig:
    width, height = parse_film_size(size)
    return SynthConfig(out=str(folder), n=n, size=width, height=height, mix=mix, seed=SEED)


def films(folder: Path) -> list[Path]:
    """The archive's image files (``_``/``.`` names are metadata), in a stable order."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(("_", "."))
    )


def archive(n: int, size: str, mix: bool, cache: Path, unique: int | None = None) -> Path:
    """``n`` synthetic films of ``size`` (``512`` or ``2400x2800``), PNG or the realistic
    mix; with ``unique`` < n, only that many are rendered (about 0.2 core-seconds each
    at 512 px, seconds each at detector size) and the rest are hard links to them, each
    read and decoded on its own like any other file."""
    unique = min(unique or n, n)
    kind = "mix" if mix else "synth"  # synth-N-SIZE: the PNG archives' names as before
    folder = cache / (f"{kind}-{n}-{size}" if unique == n else f"{kind}-{n}-{size}-u{unique}")
    if (folder / "_manifest.csv").exists():
        return folder
    if unique == n:
        log(f"writing {folder}")
        write_archive(synth_config(folder, n, size, mix))
        return folder
    rendered = films(archive(unique, size, mix, cache))
    for i in range(n):
        src = rendered[i % unique]
        dst = folder / src.parent.name / f"cxr-{i:06d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.link(src, dst)
    (folder / "_manifest.csv").write_text("links\n")
    return folder


def film_formats(folder: Path, n: int, size: str, mix: bool) -> dict[Path, str]:
    """Each film of a rendered archive (not a linked one) and its synth format."""
    cfg = synth_config(folder, n, size, mix)
    return {p: film_format(cfg, int(p.stem.split("-")[1])) for p in films(folder)}


def first_films_manifest(folder: Path, k: int, cache: Path) -> Path:
    """A manifest (uri, label from the class folder) of the archive's first ``k`` films
    by index (by path they are sorted by class)."""
    first = sorted(films(folder), key=lambda p: p.name)[:k]
    path = cache / f"_{folder.name}-first{k}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uri", "label"])
        writer.writerows((str(p.resolve()), p.parent.name) for p in first)
    return path
