"""``meddx audit``: what the runs over a results tree did, from its audit log
(``meddx.store.audit``); and ``recording``, which tells the log what command line ran.

    meddx audit OUT [--since 2026-12-01] [--study PSEUDONYM]
"""

from __future__ import annotations

import datetime as dt
import functools

import click
from click.core import ParameterSource

from meddx.cli.options import storage_option

SHA_SHOWN = 12  # characters of a sha256 in a table: enough to tell checkpoints apart
INPUT_SHOWN = 40  # of an input's URI, so that a run stays one line


def recording(command: click.Command) -> click.Command:
    """``command``, setting for the runs it makes the invocation their audit records
    name: the command, and the options given on the command line (not their defaults,
    and nothing from the environment), shown without credentials."""
    callback = command.callback

    @functools.wraps(callback)
    def recorded(*args, **kwargs):
        from meddx.store import audit

        ctx = click.get_current_context()
        options = {
            name: audit.shown_option(name, _plain(value))
            for name, value in ctx.params.items()
            if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
        }
        token = audit.INVOCATION.set(audit.Invocation(ctx.command_path, options))
        try:
            return callback(*args, **kwargs)
        finally:
            audit.INVOCATION.reset(token)

    command.callback = recorded
    return command


def _plain(value):
    """--s3-endpoint's settings as the endpoint given (the CA bundle is the environment's)."""
    return getattr(value, "s3_endpoint", value)


def _day(ctx, param, value) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"not a date: {value!r} (YYYY-MM-DD)") from None


def _when(time: dt.datetime | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S") if time else "-"


def _short(text: str | None, width: int) -> str:
    text = text or "-"
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _models(names: list | None, shas: list | None) -> str:
    pairs = zip(names or [], shas or [], strict=False)
    return ", ".join(f"{n or '-'} {s[:SHA_SHOWN] or '-'}" for n, s in pairs) or "-"


def _command(run: dict) -> str:
    """The command that ran, and the command line's where it was another (listen)."""
    invoked = (run.get("invoked") or "").removeprefix("meddx ")
    command = run.get("command") or "-"
    return command if invoked in ("", command) else f"{command} ({invoked})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def _count(value) -> str:
    return "-" if value is None else str(value)


@click.command()
@click.argument("out")
@click.option(
    "--since",
    default=None,
    metavar="YYYY-MM-DD",
    callback=_day,
    help="Only runs with a record on or after this day (UTC).",
)
@click.option(
    "--study",
    default=None,
    metavar="PSEUDONYM",
    help="What happened to this study (its pseudonym, as results and worklists name it): "
    "its inputs, with the run, model and outcome of each.",
)
@storage_option
def audit(out, since, study, storage):
    """What the runs over OUT did, from its audit log (OUT/_audit/).

    One line a run: when it began, the command, who ran it where, the models (name and
    sha256), the input, how it ended and its exit status, and the rows it committed. A
    run with a start and no end record was killed: "did not finish". With --study, the
    study's inputs, each with its run, model and outcome.
    """
    from meddx import MeddxError
    from meddx.inputs import storage as stores
    from meddx.store import audit as log

    if not stores.exists(out, storage):
        raise MeddxError(f"no results under {out}")
    runs = log.runs(out, storage, since)
    if study:
        _study(out, storage, since, study, runs)
        return
    if not runs:
        click.echo(f"no audit records under {out}")
        return
    header = ["began (UTC)", "run", "command", "user@host", "model", "input", "outcome"]
    header += ["exit", "rows", "errors", "results"]
    lines = []
    for run in runs:
        results = "-"
        if run.get("results_to"):
            results = f"{_count(run.get('reports_stored'))} SR to {run['results_to']}"
            if run.get("reports_failed"):
                results += f" ({run['reports_failed']} failed)"
        lines.append(
            [
                _when(run["started"]),
                run["run_id"],
                _command(run),
                f"{run.get('user') or '-'}@{run.get('host') or '-'}",
                _models(run.get("model_names"), run.get("model_sha256")),
                _short(run.get("input"), INPUT_SHOWN),
                run.get("outcome") or "-",
                _count(run.get("exit_status")),
                _count(run.get("rows")),
                _count(run.get("errors")),
                results,
            ]
        )
    click.echo("\n".join(_table(header, lines)))


def _study(out, storage, since, study: str, runs: list[dict]) -> None:
    """The study's inputs and their outcomes, run by run; and the runs that reported it."""
    from meddx.store import audit as log

    found = log.inputs_of_study(out, storage, study, since).to_pylist()
    by_id = {run["run_id"]: run for run in runs}
    reported = [r for r in runs if study in (r.get("reported_studies") or [])]
    if not found and not reported:
        click.echo(f"no input of study {study} in the audit log under {out}")
        return
    lines = []
    for row in found:
        run = by_id.get(row["run_id"], {})
        lines.append(
            [
                _when(row["time"]),
                row["run_id"],
                _command(run),
                _models([row["model_name"]], [row["model_sha256"]]),
                row["input_id"],
                row["status"] or "-",
                row["qc"] or "-",
            ]
        )
    inputs, ran = len({r["input_id"] for r in found}), len({r["run_id"] for r in found})
    click.echo(f"study {study}: {inputs} inputs, {len(found)} rows in {ran} runs")
    header = ["committed (UTC)", "run", "command", "model", "input", "status", "qc"]
    if lines:
        click.echo("\n".join(_table(header, lines)))
    for run in reported:
        click.echo(
            f"report stored on {run['results_to']} by run {run['run_id']} "
            f"({_when(run.get('ended'))}, {_models(run['model_names'], run['model_sha256'])})"
        )
