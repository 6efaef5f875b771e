"""Options that several commands take, declared once, and the helpers that turn a
command's options into its config.

An option is named as the config field it fills and shows the config's default, so the
default is written once (``meddx.config``, ``meddx.names``); the limits on its value are
the config's own checks, reported as usage errors.
"""

from __future__ import annotations

import dataclasses
import os

import click

from meddx import MeddxError, names
from meddx.inputs.storage import StorageSettings


def default(config, name: str):
    """A config field's default, so ``--help`` shows what the library will use."""
    return next(f for f in dataclasses.fields(config) if f.name == name).default


def option(config, name: str, *decls: str, **kwargs):
    """``--NAME`` (or ``decls``) filling the config field NAME, with the field's default
    (shown in ``--help``) and, for a number, its type. A tuple default is shown as the
    comma-separated list the option takes."""
    value = default(config, name)
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    kwargs.setdefault("default", value)
    if not kwargs.get("is_flag"):
        kwargs.setdefault("show_default", True)
    if "type" not in kwargs and type(value) in (int, float):
        kwargs["type"] = type(value)
    return click.option(*(decls or [f"--{name.replace('_', '-')}"]), name, **kwargs)


def parsed(parse):
    """A click callback from a parser of names.py: its refusal is a usage error."""

    def callback(ctx, param, value):
        try:
            return None if value is None else parse(value)
        except MeddxError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def build(config, **fields):
    """The command's config. A value its checks refuse is a usage error (exit 2), as a
    value click refuses would be."""
    try:
        return config(**fields)
    except MeddxError as exc:
        raise click.UsageError(str(exc), ctx=click.get_current_context()) from None


def options(declared: list):
    """Apply a list of click options in the order they are listed."""

    def apply(command):
        for declaration in reversed(declared):
            command = declaration(command)
        return command

    return apply


def given(opts: dict) -> dict:
    """The options that were given a value: the others keep the config's default."""
    return {k: v for k, v in opts.items() if v is not None}


def with_ca_bundle(opts: dict) -> dict:
    """--ca-bundle joins the storage settings, which every Ray task receives."""
    ca = opts.pop("ca_bundle", None)
    if ca:
        opts["storage"] = dataclasses.replace(opts["storage"], ca_bundle=os.path.abspath(ca))
    return opts


def _storage(ctx, param, value) -> StorageSettings:
    return StorageSettings.from_env(value)


storage_option = click.option(
    "--s3-endpoint",
    "storage",
    envvar="MEDDX_S3_ENDPOINT",
    default=None,
    metavar="URL",
    callback=_storage,
    help="S3-compatible endpoint (MinIO, Ceph, ...); env MEDDX_S3_ENDPOINT. "
    "Credentials come from the standard AWS chain.",
)


def max_object_bytes_option(config):
    return option(
        config,
        "max_object_bytes",
        help="Refuse any object or tar member larger than this (read no further).",
    )


labels_option = click.option(
    "--labels",
    default=None,
    metavar="MANIFEST",
    help="CSV/Parquet manifest with uri,label [default: class folder in image_uri].",
)

scored_by_option = click.option(
    "--model", required=True, metavar="CKPT", help="The checkpoint that scored them."
)


def findings_option(help: str):
    """--findings: the finding column names, in the order the model outputs them."""
    return click.option(
        "--findings",
        default=None,
        metavar="LIST",
        callback=parsed(names.parse_finding_names),
        help=help,
    )


modalities_option = click.option(
    "--modalities",
    default=None,
    metavar="LIST",
    callback=parsed(names.parse_modalities),
    help="DICOM Modality values to score, e.g. CR,DX, or 'any' [default: the checkpoint's].",
)
views_option = click.option(
    "--views",
    default=None,
    metavar="LIST",
    callback=parsed(names.parse_views),
    help="DICOM ViewPosition values the model reads, e.g. PA,AP, or 'any'; other views "
    "are qc=wrong_view [default: the checkpoint's].",
)

rules_option = click.option(
    "--rules",
    default=None,
    metavar="FILE",
    help="Selection rules (TOML or YAML; docs/rules.md): DICOM images they select out get "
    "a row with status skipped [default: the checkpoint's, else FOR PROCESSING images and "
    "non-image SOP classes are skipped].",
)


results_to_option = click.option(
    "--results-to",
    default=None,
    metavar="PACS",
    help="Also store a DICOM Structured Report of each scored study in its study on this "
    "PACS: dicomweb+http(s)://HOST/PATH (STOW-RS) or dimse://AET@HOST:PORT (C-STORE). "
    "Sent again, whole, when more of the study is scored. Needs a PACS INPUT (DICOMweb "
    "or DIMSE), or meddx listen.",
)


metrics_file_option = click.option(
    "--metrics-file",
    default=None,
    metavar="FILE.prom",
    help="Write the run's metrics (when, how long, success, rows, errors, QC rate, drift, "
    "alarms) to this file for node-exporter's textfile collector, failed runs too "
    "[default: none].",
)
pushgateway_option = click.option(
    "--pushgateway",
    default=None,
    metavar="URL",
    help="Push the same metrics to this Prometheus Pushgateway, as job meddx_COMMAND "
    "[default: none].",
)
