"""launch/tpu_pod.sh installs its tools from the package index at pinned versions and never
pipes a downloaded script into a shell (it used to run uv's install script on every worker)."""

from __future__ import annotations

import re
import subprocess

from tests.helpers import ROOT


def _dry_run_install_command() -> str:
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "tpu_pod.sh"),
            "--name=n",
            "--zone=z",
            "--accelerator=v4-32",
            "--workdir=gs://b/r",
            "--dry_run",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "tar -xzf" in line]
    assert len(lines) == 1, result.stdout
    return lines[0]


def test_no_remote_script_is_run_and_tools_are_pinned():
    install = _dry_run_install_command()
    assert "curl" not in install and "wget" not in install
    assert not re.search(r"\|\s*(ba)?sh\b", install), install
    assert re.search(r"pip install --user -q uv==\d+\.\d+\.\d+", install), install
    assert re.search(r"uv venv --seed --python 3\.11\.\d+ ", install), install
