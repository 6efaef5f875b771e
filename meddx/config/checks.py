"""What every configuration checks its options with, and the image sides that training
and imported checkpoints share."""

from __future__ import annotations

import datetime as dt
import os

from meddx import MeddxError

# Image sides training accepts: below 32 px the networks' strides leave nothing; above
# 1,024 a batch of 32 no longer fits a worker's memory.
IMAGE_SIZES = (32, 1024)
# The input side torchvision's classifiers were designed for, and meddx trains at.
DEFAULT_IMAGE_SIZE = 224


def at_least(low: float, config, *names: str) -> None:
    """Refuse a config whose field NAME (an option --NAME) is below ``low``; None (the
    default chosen later) passes."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= low:
            raise MeddxError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def one_of(choices: tuple[str, ...], config, name: str) -> None:
    """Refuse a config whose field NAME (an option --NAME) is not one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise MeddxError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")


def check_run_date(text: str) -> None:
    """Refuse a run date that is not YYYY-MM-DD: the partition's name, one spelling per date."""
    try:
        canonical = dt.date.fromisoformat(text).isoformat() == text
    except (TypeError, ValueError):
        canonical = False
    if not canonical:
        raise MeddxError(f"--run-date must be YYYY-MM-DD, got {text!r}")


def check_metrics_targets(config) -> None:
    """Refuse a ``metrics_file`` node-exporter would never read (it reads local *.prom
    files) or whose folder is missing, and a ``pushgateway`` that is no http(s) URL:
    caught before the run, not found missing after a silent night."""
    path, url = config.metrics_file, config.pushgateway
    if path is not None:
        if "://" in path or not path.endswith(".prom"):
            raise MeddxError(f"--metrics-file must be a local file named *.prom, got {path!r}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise MeddxError(f"--metrics-file's folder does not exist: {path}")
    if url is not None and not url.lower().startswith(("http://", "https://")):
        raise MeddxError("--pushgateway must be an http:// or https:// URL")
