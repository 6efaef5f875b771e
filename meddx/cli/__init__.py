"""The ``meddx`` command line: the click group, logging to the console, exit codes.

One module per family of commands: ``data`` (synth, demo), ``training`` (train),
``scoring`` (score, screen), ``analysis`` (evaluate, calibrate, explain), ``model``
(optimize, import-weights) and ``audit`` (audit, and what its log says of each command
line); ``options`` declares what several of them take. Each command builds a frozen
config (``meddx.config``), calls one library function and formats what it returns. The
CLI is the top of meddx: no part of the library imports it. It must not import torch or
Ray when it is loaded (``--help`` and a mistyped option stay fast): a command imports
what it runs when it runs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import NoReturn

import click

from meddx import MeddxAlarm, MeddxBusy, MeddxError, __version__
from meddx.cli import analysis, audit, data, listening, model, rules, scoring, training


class ConsoleHandler(logging.Handler):
    """Log records on stderr through click, so that a stream replaced after the handler
    was made (a test's capture, CliRunner) still receives them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:
            self.handleError(record)


def log_to_console(level: int):
    """Send the library's log records (the ``meddx`` logger and every module under it)
    at ``level`` and above to stderr, once: not also through the root logger. Library
    messages name themselves (``meddx: ...``). Returns the function that undoes it."""
    logger = logging.getLogger("meddx")
    handler = ConsoleHandler()
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]

    return undo


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meddx")
@click.option("--quiet", "-q", is_flag=True, help="Log only warnings and errors.")
@click.option("--verbose", "-v", is_flag=True, help="Log debug lines too.")
@click.pass_context
def cli(ctx, quiet, verbose):
    """Score and train CNNs on medical image archives (local or S3) with Ray.

    Progress, summaries and errors always show; --quiet and --verbose set what the
    library logs besides (on stderr).
    """
    if quiet and verbose:
        raise click.UsageError("give --quiet or --verbose, not both", ctx=ctx)
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    ctx.call_on_close(log_to_console(level))


for command in (
    data.synth,
    data.prepare,
    training.train,
    scoring.score,
    scoring.screen,
    listening.listen,
    analysis.evaluate,
    analysis.calibrate,
    analysis.explain,
    model.optimize,
    model.import_weights,
    data.demo,
    data.reindex,
    rules.rules,
    audit.audit,
):
    cli.add_command(audit.recording(command))  # the command line its runs' audit names


def _terminated(signum, frame):
    # SIGTERM (a scheduler's timeout, ray job stop) unwinds like Ctrl-C, so a run's lease
    # on OUT is released on the way out. Ray's driver installs the same once it starts.
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and a non-zero exit, no traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(args=argv, prog_name="meddx", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help())
        sys.exit(2)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"meddx: error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("meddx: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except MeddxError as exc:
        if isinstance(exc, MeddxAlarm):
            click.echo(f"meddx: alarm: {exc}", err=True)
            sys.exit(3)
        if isinstance(exc, MeddxBusy):
            click.echo(f"meddx: busy: {exc}", err=True)
            sys.exit(4)
        click.echo(f"meddx: error: {exc}", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"meddx: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)


def run(argv: list[str] | None = None) -> NoReturn:
    """The ``meddx`` command: main(), then the exit. What the command printed is
    flushed and Ray stopped (cluster.stop_ray), and the process ends without the
    interpreter's teardown, which does nothing for a finished run and took most of a
    second with torch loaded. A caller of main() keeps its process."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            click.echo(exc.code, err=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if "ray" in sys.modules:
        from meddx.pipelines import cluster

        cluster.stop_ray()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
