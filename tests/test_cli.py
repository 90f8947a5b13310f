"""Every command has --help, and errors are one line with the exact text."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app, train_app

runner = CliRunner()


def _commands(app):
    import typer.main

    group = typer.main.get_command(app)
    return sorted(getattr(group, "commands", {}) or {})


def test_top_level_help():
    r = runner.invoke(mine_app, ["--help"])
    assert r.exit_code == 0 and "Offline hard-negative mining" in r.output, r.output
    r = runner.invoke(train_app, ["--help"])
    assert r.exit_code == 0 and "--work" in r.output


@pytest.mark.parametrize("cmd", _commands(mine_app))
def test_every_command_has_help(cmd):
    r = runner.invoke(mine_app, [cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and len(r.output.splitlines()) > 3


def test_commands_are_documented():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [c for c in _commands(mine_app) if f"cir-mine {c}" not in readme]
    assert not missing, f"README does not mention: {missing}"


def test_error_has_no_traceback_and_exit_code(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", "from cli import mine_main; mine_main()", "info", "--work", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"Error: {tmp_path / 'nope'}: workspace directory not found. Create one with "
        f"`cir-mine synth` or `cir-mine embed`, or point --work at an existing workspace."
    )
    assert "Traceback" not in r.stderr


def test_usage_error_exit_2(tmp_path):
    r = runner.invoke(mine_app, ["synth", "--out", str(tmp_path / "w"), "--n-gallery", "10", "--n-triplets", "9"])
    assert r.exit_code == 2
    assert (
        r.output.strip()
        == "Error: --n-triplets (9) must be at most half of --n-gallery (10): each target is its own gallery item."
    )
    assert not (tmp_path / "w" / "gallery.train.parquet").exists()


def test_synth_and_info(tmp_path):
    r = runner.invoke(
        mine_app, ["synth", "--out", str(tmp_path), "--n-gallery", "200", "--n-triplets", "20", "--dim", "16", "-q"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(mine_app, ["info", "--work", str(tmp_path)])
    assert r.exit_code == 0 and "train: 200 images, 20 triplets" in r.output
