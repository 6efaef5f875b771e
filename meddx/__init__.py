"""meddx: score and train CNNs on medical image archives with Ray."""

import sys

__version__ = "0.1.0"

# No usage reports. OpenVINO's model converter and NNCF send them through the
# openvino-telemetry package unless a consent file under ~/intel says no, and create
# that folder and a client id on first use; neither has a switch of its own. Both fall
# back to a silent stub when the package cannot be imported: block its import for every
# process that imports meddx (Ray's usage stats are off in pipelines/cluster.py).
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

# An error column holds one line: room for a path and its reason, short enough that a
# table of errors (or an error hiding a long payload) stays readable.
ERROR_TEXT_CHARS = 300


class MeddxError(Exception):
    """A user-facing error: bad input, bad option, missing file. Printed as one line."""


class MeddxAlarm(MeddxError):
    """The run finished and wrote everything, but something needs a human (exit 3)."""


class MeddxBusy(MeddxError):
    """Another run holds the lease on OUT: nothing was done (exit 4)."""


def one_line(exc: BaseException, limit: int = ERROR_TEXT_CHARS) -> str:
    """An exception as one short line (no newlines, bounded length) for an error column."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]
