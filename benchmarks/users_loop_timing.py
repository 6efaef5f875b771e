"""(b) of bench.py, the loop users write for an archive, timed: a torch Dataset and
DataLoader over its files; and its decode per format against meddx's, on one core."""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from ceilings import MODEL_SIZE
from decode_formats import best_ms, users_loop
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from meddx.imaging import decode
from meddx.names import SYNTH_FORMATS

BATCH = 64  # the users' loop's batch


class ArchiveDataset(Dataset):
    """The Dataset users write over an archive's files: decode_formats.users_loop (pydicom
    pixel_array + modality and VOI LUTs, MONOCHROME1 inverted, or PIL, 16-bit PNG as
    I;16; scaled to [0, 1]; antialiased Resize to 224), then 3 channels normalised with
    the checkpoint's mean and std, as meddx's to_model_input feeds the model."""

    def __init__(self, paths: list[Path], mean, std):
        self.paths = paths
        self.normalize = transforms.Normalize(mean, std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        x = users_loop(path.read_bytes(), MODEL_SIZE)  # (1, 224, 224) float in [0, 1]
        return self.normalize(x.expand(3, -1, -1)), path.parent.name


def users_loop_rate(
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device,
    workers: int,
    seconds: float | None = None,
) -> float:
    """Images/s of the users' loop with ``workers`` DataLoader processes (their start-up
    included, as a user pays it); over the first ``seconds`` if given."""
    start, n = time.perf_counter(), 0
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers)
    with torch.inference_mode():
        for x, _ in loader:
            model(x.to(device).contiguous(memory_format=torch.channels_last)).cpu()
            n += len(x)
            if seconds is not None and time.perf_counter() - start > seconds:
                break
    return n / (time.perf_counter() - start)


def decode_ms_per_format(formats: dict[Path, str], per_format: int) -> dict[str, dict]:
    """Decode ms per film, p50 over up to ``per_format`` films of each format (best of 3
    each), on one core: meddx's decode_image against the users' loop's decode."""
    counts = Counter(formats.values())
    sample = defaultdict(list)
    for path, fmt in formats.items():
        if len(sample[fmt]) < per_format:
            sample[fmt].append(path.read_bytes())
    settings = decode.DecodeSettings(size=MODEL_SIZE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as one decode task has
    rows = {}
    try:
        for fmt in (f for f in SYNTH_FORMATS if f in sample):
            data = sample[fmt]
            meddx_ms = statistics.median(
                best_ms(lambda d=d: decode.decode_image(d, settings)) for d in data
            )
            loop_ms = statistics.median(
                best_ms(lambda d=d: users_loop(d, MODEL_SIZE)) for d in data
            )
            rows[fmt] = {
                "share": round(counts[fmt] / len(formats), 3),
                "films_timed": len(data),
                "mb_per_film": round(statistics.mean(len(d) for d in data) / 1e6, 2),
                "meddx_p50_ms": round(meddx_ms, 1),
                "users_loop_p50_ms": round(loop_ms, 1),
                "users_loop_over_meddx": round(loop_ms / meddx_ms, 2),
            }
    finally:
        torch.set_num_threads(threads)
    return rows
