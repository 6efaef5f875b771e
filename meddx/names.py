"""Names and defaults that every layer shares, written once.

Imports neither torch nor Ray, so the command line can offer them as choices and show
them in ``--help`` without paying for either import.
"""

from __future__ import annotations

import pyarrow as pa

from meddx import MeddxError

# ---- models and precision -----------------------------------------------------------

# The architectures meddx can build (all from random initialisation, nothing downloaded).
MODEL_NAMES = ("seednet", "resnet18", "resnet50", "densenet121")
DEFAULT_MODEL = "resnet18"
# auto: bf16 on GPUs and on CPUs with native bf16 (fp16 on older GPUs), else fp32.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Inference batch when none is asked for: a GPU needs large batches to stay busy (the
# uint8 batch is 38 MB at 224 px); on CPU larger batches gain nothing and hold memory.
GPU_BATCH = 256
CPU_BATCH = 64

# ---- labels ----------------------------------------------------------------------------

# The single-label vocabulary: ``normal`` and the finding a screening model looks for.
NORMAL = "normal"
SINGLE_LABEL_CLASSES = (NORMAL, "opacity")
# The positive class of a multi-label model's screening score: any finding present.
ABNORMAL = "abnormal"
# A multi-label row's label: the findings at or above their thresholds, joined by ";" in
# the checkpoint's order ("effusion;nodule"), or "normal" when there is none.
NO_FINDING = NORMAL
LABEL_SEPARATOR = ";"
# Manifest columns that are not findings.
MANIFEST_COLUMNS = ("uri", "label", "study_id")
# The labelled archive's manifest (``meddx synth`` writes it, ``meddx train`` reads it).
MANIFEST_NAME = "_manifest.csv"
# A DICOMweb server as INPUT or --results-to (inputs/dicomweb.py).
DICOMWEB_SCHEMES = ("dicomweb+http://", "dicomweb+https://")
# A PACS over DIMSE as INPUT or --results-to (inputs/dimse.py): dimse://AET@HOST:PORT.
DIMSE_SCHEME = "dimse://"

# Formats ``meddx synth`` writes: what chest archives hold. ``png`` and ``jpeg`` are 8-bit
# exports (ChestX-ray14, MIMIC-CXR-JPG), ``png16`` a 16-bit export (PadChest); ``dicom``
# is uncompressed, the rest are DICOM transfer syntaxes: JPEG 2000 lossless and lossy (VNA
# exports), RLE, JPEG-LS lossless, JPEG baseline 8-bit, and HTJ2K lossless (cloud stores).
SYNTH_FORMATS = (
    "png",
    "jpeg",
    "png16",
    "dicom",
    "dicom-j2k",
    "dicom-j2k-lossy",
    "dicom-rle",
    "dicom-jpegls",
    "dicom-jpeg",
    "dicom-htj2k",
)

# ---- limits ------------------------------------------------------------------------------

# Largest chest detectors are about 4,300 x 4,300 (18.5 Mpx); 60 Mpx leaves room for
# any real radiograph while a decompression bomb (100k x 100k) is refused before decoding.
DEFAULT_MAX_PIXELS = 60_000_000
# An object or tar member larger than this is refused unread (--max-object-bytes): no
# chest radiograph comes near 512 MiB, and a worker holds a few objects at a time.
DEFAULT_MAX_OBJECT_BYTES = 512 * 2**20
# Radiography: a chest-X-ray model must not score CT slices or MR images.
DEFAULT_MODALITIES = ("CR", "DX")
# Frontal chest views: a model trained on them must not read a lateral as a negative.
DEFAULT_VIEWS = ("PA", "AP")
# Checkpoints scored in one pass (--model more than once): each predictor actor holds
# them all, and a row's models are a bit mask of this many bits.
MAX_MODELS = 8
# Seconds without a heartbeat before the lease on OUT is stale and may be taken over.
DEFAULT_LOCK_TIMEOUT = 300.0
# The short side a store of model-ready films keeps them at (meddx prepare): twice what
# the models here take, so a model up to 512 px reads the store without upscaling.
DEFAULT_STORE_SIZE = 512
# Labelled images a precision or int8 check calibrates and checks on.
DEFAULT_CHECK_IMAGES = 1000

# ---- input quality control (the ``qc`` column) -------------------------------------------

QC_OK = "ok"
QC_OOD = "out_of_distribution"  # the model's features are far from its training data
QC_LOW_QUALITY = "low_quality"  # blank, saturated or without contrast
QC_WRONG_VIEW = "wrong_view"  # a DICOM view the model was not trained on (a lateral)
QC_VALUES = (QC_OK, QC_OOD, QC_LOW_QUALITY, QC_WRONG_VIEW)
# The worklist's section for rows whose qc is not ok: never a silent negative.
HUMAN_READ = "needs a human read"

# ---- the output row ------------------------------------------------------------------------

OUTPUT_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("probs", pa.list_(pa.float32())),
        ("threshold", pa.float32()),
        ("model_name", pa.string()),
        ("model_sha256", pa.string()),
        ("content_sha256", pa.string()),
        # DICOM attributes that identify no one (null for PNG/JPEG), image geometry,
        # and keyed-hash pseudonyms of the UIDs (null without MEDDX_PSEUDONYM_KEY).
        ("modality", pa.string()),
        ("view_position", pa.string()),
        ("body_part", pa.string()),
        ("photometric", pa.string()),
        ("transfer_syntax", pa.string()),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("frames", pa.int32()),
        ("study_pseudonym", pa.string()),
        ("series_pseudonym", pa.string()),
        ("instance_pseudonym", pa.string()),
        # Input quality control (null on error rows): ok, out_of_distribution,
        # low_quality or wrong_view; and the distance of the model's features from its
        # training data (higher is further; null without a fitted density).
        ("qc", pa.string()),
        ("ood_score", pa.float32()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)


# ---- parsing the names users type ----------------------------------------------------------


def _dicom_values(text: str, option: str, attribute: str, example: str) -> tuple[str, ...]:
    """``A,B`` -> ("A", "B") upper-cased; ``any`` -> () (every value)."""
    if text.strip().lower() == "any":
        return ()
    values = tuple(v.strip().upper() for v in text.split(",") if v.strip())
    if not values:
        raise MeddxError(f"{option} needs DICOM {attribute} values such as {example}, or 'any'")
    return values


def parse_modalities(text: str) -> tuple[str, ...]:
    """``CR,DX`` -> ("CR", "DX"); ``any`` -> () (every modality)."""
    return _dicom_values(text, "--modalities", "Modality", "CR,DX")


def parse_views(text: str) -> tuple[str, ...]:
    """``PA,AP`` -> ("PA", "AP"); ``any`` -> () (every view)."""
    return _dicom_values(text, "--views", "ViewPosition", "PA,AP")


def parse_film_size(text: str) -> tuple[int, int | None]:
    """``512`` -> (512, None) (square); ``2400x2800`` -> (2400, 2800) (width, height)."""
    width, sep, height = text.strip().lower().partition("x")
    try:
        return int(width), (int(height) if sep else None)
    except ValueError:
        raise MeddxError(
            f"{text!r} is not a size: give 512 or WIDTHxHEIGHT such as 2400x2800"
        ) from None


def parse_finding_names(text: str) -> tuple[str, ...]:
    """``opacity,effusion,nodule`` -> the findings, in the order the model outputs them."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    reserved = {*MANIFEST_COLUMNS, ABNORMAL, NO_FINDING}
    bad = [n for n in names if n in reserved or LABEL_SEPARATOR in n]
    if not names or bad or len(set(names)) != len(names):
        raise MeddxError(
            f"--findings needs distinct finding column names (not {', '.join(sorted(reserved))})"
        )
    return names


# Where the model runs: torch, or the checkpoint's OpenVINO artefact (meddx optimize);
# auto: the artefact on CPU-only clusters when it passed its accuracy check.
RUNTIMES = ("auto", "torch", "openvino")
OPTIMIZED_PRECISIONS = ("int8", "fp32")


# Grayscale is replicated to 3 channels so torchvision architectures (and weights a
# user converts from them) work unchanged; ImageNet statistics are the usual default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def positive_class_of(class_names) -> str:
    """The class whose probability is the screening score: the one that is not 'normal'."""
    others = [c for c in class_names if c != NORMAL]
    return others[0] if others else class_names[-1]


# The columns of a listing: what the one listing of a prefix returns for each object.
LISTING_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("size", pa.int64()),  # bytes; null when the source does not say
        ("mtime", pa.timestamp("us", tz="UTC")),  # last modified; null when unknown
        ("etag", pa.string()),  # the store's entity tag (S3); null where there is none
    ]
)
LISTING_BATCH_ROWS = 65_536  # rows per batch of a streamed listing
