"""meddx: score and train CNNs on medical image archives with Ray."""

__version__ = "0.1.0"


class MeddxError(Exception):
    """A user-facing error: bad input, bad option, missing file. Printed as one line."""


class MeddxAlarm(MeddxError):
    """The run finished and wrote everything, but something needs a human (exit 3)."""
