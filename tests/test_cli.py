import logging
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from meddx.cli import cli, main

from .helpers import MEDDX

COMMANDS = [
    "synth",
    "prepare",
    "train",
    "score",
    "screen",
    "listen",
    "evaluate",
    "calibrate",
    "explain",
    "optimize",
    "import-weights",
    "demo",
    "reindex",
    "audit",
    "rules",
]


def run(*args):
    return subprocess.run([MEDDX, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and "--help" in result.output


def test_top_level_help_lists_every_command():
    assert sorted(cli.commands) == sorted(COMMANDS)  # a new command gets its tests here too
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    # The first word of each line of the "Commands:" section (a bare substring would find
    # "score" in "scored" anywhere in the help).
    section = result.output.split("\nCommands:\n", 1)[1].splitlines()
    listed = [line.split()[0] for line in section if line.startswith("  ") and line.strip()]
    assert sorted(listed) == sorted(COMMANDS)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["score", "in", "--model", "m.pt", "--out", "o", "--bogus"], "No such option '--bogus'"),
        (["score", "in", "--out", "o"], "Missing option '--model'"),
        (["score", "in", "--model", "m", "--out", "o", "--run-date", "yesterday"], "YYYY-MM-DD"),
        (["train", "d", "--out", "m.pt", "--model", "vgg"], "'vgg' is not one of"),
        (["train", "d", "--out", "m.pt", "--workers", "0"], "--workers"),
        (["synth", "out", "--n", "-3"], "--n"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (
            ["score", "in", "--model", "m", "--out", "o", "--runtime", "onnx"],
            "'onnx' is not one of",
        ),
        (["optimize", "m.pt", "--out", "o.pt"], "Missing option '--calibration'"),
        (["prepare", "in"], "Missing option '--out'"),
        (["prepare", "in", "--out", "s", "--size", "4096"], "--size must lie in"),
        (["listen", "--archive", "a", "--model", "m", "--out", "o"], "Missing option '--allow-ae'"),
        (
            ["listen", "--archive", "a", "--model", "m", "--out", "o", "--allow-ae", "A\\B"],
            "not an AE title",
        ),
        (
            [
                "listen",
                "--archive",
                "a",
                "--model",
                "m",
                "--out",
                "o",
                "--allow-ae",
                "A",
                "--port",
                "70000",
            ],  # fmt: skip
            "--port must lie in [0, 65535]",
        ),
        (
            [
                "listen",
                "--archive",
                "a",
                "--model",
                "m",
                "--out",
                "o",
                "--allow-ae",
                "A",
                "--tls-cert",
                "README.md",
            ],  # fmt: skip
            "--tls-cert and --tls-key go together",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(args, expected):
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meddx: error:") and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_input_is_one_line_error(tmp_path):
    result = run("score", str(tmp_path / "nothing-here"), "--model", "m.pt", "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"meddx: error: input not found: {tmp_path / 'nothing-here'}"
    ]


def test_missing_checkpoint_is_one_line_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    result = run("score", str(tmp_path), "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"meddx: error: checkpoint not found: {tmp_path / 'm.pt'}"


def test_synth_command(tmp_path):
    result = run("synth", str(tmp_path / "a"), "--n", "4", "--size", "64", "--format", "jpeg")
    assert result.returncode == 0, result.stderr
    assert "wrote 4 images (2 opacity)" in result.stdout
    assert len(list((tmp_path / "a").rglob("*.jpg"))) == 4


def test_version():
    result = run("--version")
    assert result.returncode == 0 and "meddx, version" in result.stdout


def test_pinned_checkpoint_refuses_another_file(tmp_path, random_checkpoint):
    (tmp_path / "a.png").write_bytes(b"x")
    result = run(
        "score",
        str(tmp_path),
        "--model",
        random_checkpoint[0],
        "--out",
        str(tmp_path / "o"),
        "--model-sha256",
        "f" * 64,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not the pinned ffffffffffffffff" in lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["synth", "out", "--findings", "opacity,bogus"], "unknown finding 'bogus'"),
        (["synth", "out", "--findings", "nodule=lots"], "the prevalence must be a number"),
        (["train", "d", "--out", "m.pt", "--findings", "label"], "--findings needs distinct"),
    ],
)
def test_bad_findings_are_one_line_errors(args, expected, tmp_path):
    result = subprocess.run(
        [MEDDX, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2 and result.stdout == ""  # a usage error, as click's own
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meddx: error:") and expected in lines[0]
    assert not any(tmp_path.iterdir())
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_demo_without_moto_says_what_to_install(tmp_path):
    """A plain install (no demo extra): one line naming the extra, no traceback."""
    hide_moto = (
        "import sys; sys.modules['moto'] = None; sys.modules['moto.server'] = None;"
        "from meddx.cli import main; main(['demo', '--workdir', sys.argv[1]])"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide_moto, str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'meddx[demo]'" in lines[0], result.stderr
    assert lines[0].startswith("meddx: error:") and "Traceback" not in result.stderr
    assert not (tmp_path / "demo").exists()  # refused before anything was written


def test_cli_imports_neither_torch_nor_ray():
    """--help and argument errors stay fast: names and defaults come from torch-free modules."""
    code = (
        "import sys, meddx.cli; "
        "print(sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@click.command("log-probe")
def log_probe():
    """Logs as a library module does, at three levels."""
    log = logging.getLogger("meddx.store.lease")
    log.debug("meddx: a debug line")
    log.info("meddx: an info line")
    log.warning("meddx: a warning line")


@pytest.mark.parametrize(
    "options, expected",
    [
        ([], ["meddx: an info line", "meddx: a warning line"]),
        (["--quiet"], ["meddx: a warning line"]),
        (["--verbose"], ["meddx: a debug line", "meddx: an info line", "meddx: a warning line"]),
    ],
)
def test_library_log_lines_reach_stderr_once_at_the_chosen_level(
    options, expected, monkeypatch, capsys
):
    monkeypatch.setitem(cli.commands, "log-probe", log_probe)
    beside = logging.Handler()  # as a library's logging.basicConfig() would add to root
    beside.emit = lambda record: pytest.fail(f"also through the root logger: {record.msg}")
    logging.getLogger().addHandler(beside)
    try:
        main([*options, "log-probe"])
    finally:
        logging.getLogger().removeHandler(beside)
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.splitlines() == expected
    # Afterwards the library logs as it did before the command (tests' caplog sees it).
    assert logging.getLogger("meddx").propagate and not logging.getLogger("meddx").handlers


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--quiet", "--verbose", "synth", "out"], "give --quiet or --verbose, not both"),
        (
            ["calibrate", "p", "--model", "m", "--out", "o"]
            + ["--target-sensitivity", "0.9", "--target-specificity", "0.9"],
            "give one of --target-sensitivity, --target-specificity",
        ),
        (["calibrate", "p", "--model", "m", "--out", "o"], "and/or --ood-percentile"),
        (["synth", "out", "--quality-set", "--mix"], "--quality-set takes a square --size"),
        (["explain", "p", "--model", "m", "--out", "o", "--top", "0"], "--top must be at least 1"),
        (
            ["calibrate", "p", "--model", "m", "--out", "o", "--target-sensitivity", "0"],
            "--target-sensitivity must lie in (0, 1], got 0.0",
        ),
        (
            ["calibrate", "p", "--model", "m", "--out", "o", "--ood-percentile", "40"],
            "--ood-percentile must lie in [50, 100], got 40.0",
        ),
        (
            ["screen", "s", "--model", "m", "--out", "o", "--since", "-1"],
            "--since must be at least 0",
        ),
        (
            ["score", "i", "--model", "m", "--out", "o", "--max-object-bytes", "0"],
            "--max-object-bytes must be at least 1, got 0",
        ),
        (
            ["import-weights", "w", "--model", "resnet18", "--out", "o"]
            + ["--classes", "normal,opacity", "--input-size", "16"],
            "--input-size must lie in [32, 1024], got 16",
        ),
        (["demo", "--n-train", "5"], "--n-train must be at least 20"),
    ],
)
def test_command_configs_refuse_in_one_line(args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written, here or anywhere
    with pytest.raises(SystemExit) as exited:
        main(args)
    printed = capsys.readouterr()
    assert exited.value.code == 2 and printed.out == ""
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meddx: error:") and expected in lines[0]
    assert not any(tmp_path.iterdir())
