"""Decode time per film and format, on one core: meddx against the loop users write.

    python benchmarks/decode_formats.py --size 2400x2800 --n 5 [--out results.json]

For each synth format, N detector-size films are written once (cached under
benchmarks/.cache), then decoded to 224 px three ways, each p50 over the films (best of
3 runs per film):

- meddx: ``decode.decode_image`` (only the resolution the model needs);
- the user's loop: pydicom's pixel_array + modality LUT + VOI LUT (or PIL for PNG/JPEG),
  scaled to [0, 1], then torchvision's antialiased Resize to 224;
- bare: the fastest decoder alone at full size, for the formats no codec can reduce
  (uncompressed, RLE, JPEG-LS, 16-bit PNG), the floor meddx's full-size path stands on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from meddx.config import SynthConfig
from meddx.imaging import decode
from meddx.names import SYNTH_FORMATS, parse_film_size
from meddx.synthetic.chest import write_archive

FULL_SIZE_ONLY = {"dicom", "dicom-rle", "dicom-jpegls", "png16"}


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), ""
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    wanted = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni")]
    return f"{model or platform.processor()} ({os.cpu_count()} cores; {' '.join(sorted(wanted))})"


def users_loop(data: bytes, size: int):
    import pydicom
    import torch
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from torchvision.transforms import v2

    if data[128:132] == b"DICM":
        ds = pydicom.dcmread(io.BytesIO(data))
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = arr.max() - arr
    else:
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("I;16" if data[24] == 16 else "L"))
        arr = arr.astype(np.float32)
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
    return v2.Resize((size, size), antialias=True)(torch.from_numpy(arr)[None])


def bare(data: bytes, fmt: str):
    """The fastest decoder alone, at full size."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import pixel_array

    if fmt == "png16":
        return np.asarray(Image.open(io.BytesIO(data)))
    ds = pydicom.dcmread(io.BytesIO(data))
    if fmt == "dicom":
        return np.frombuffer(ds.PixelData, dtype="<u2")
    plugin = {"dicom-rle": "pylibjpeg", "dicom-jpegls": "pyjpegls"}[fmt]
    return pixel_array(ds, decoding_plugin=plugin)


def best_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2400x2800")
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--model-size", type=int, default=224)
    parser.add_argument("--out")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one core, as one decode task has
    width, height = parse_film_size(args.size)
    cache = Path(__file__).parent / ".cache" / f"formats-{args.size}-{args.n}"
    settings = decode.DecodeSettings(size=args.model_size)
    rows = []
    for fmt in SYNTH_FORMATS:
        folder = cache / fmt
        if not (folder / "_manifest.csv").exists():
            w, h = (1024, 1024) if fmt == "png" else (width, height)  # ChestX-ray14: 1,024
            write_archive(
                SynthConfig(out=str(folder), n=args.n, size=w, height=h, format=fmt, seed=31)
            )
        films = [p.read_bytes() for p in sorted(folder.rglob("cxr-*"))]
        meddx_ms = [best_ms(lambda d=d: decode.decode_image(d, settings)) for d in films]
        loop_ms = [best_ms(lambda d=d: users_loop(d, args.model_size)) for d in films]
        row = {
            "format": fmt,
            "films": len(films),
            "mb_per_film": round(statistics.mean(len(d) for d in films) / 1e6, 2),
            "meddx_p50_ms": round(statistics.median(meddx_ms), 1),
            "users_loop_p50_ms": round(statistics.median(loop_ms), 1),
        }
        if fmt in FULL_SIZE_ONLY:
            bare_ms = statistics.median(best_ms(lambda d=d, f=fmt: bare(d, f)) for d in films)
            row["bare_decode_p50_ms"] = round(bare_ms, 1)
            row["meddx_over_bare"] = round(row["meddx_p50_ms"] / bare_ms, 2)
        rows.append(row)
        print(
            f"{fmt:16s} {row['mb_per_film']:6.2f} MB  meddx {row['meddx_p50_ms']:7.1f} ms  "
            f"user's loop {row['users_loop_p50_ms']:7.1f} ms"
            + (
                f"  bare {row['bare_decode_p50_ms']:6.1f} ms ({row['meddx_over_bare']}x)"
                if "bare_decode_p50_ms" in row
                else ""
            ),
            flush=True,
        )
    result = {"cpu": cpu(), "film": args.size, "model_size": args.model_size, "formats": rows}
    print(f"cpu: {result['cpu']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
