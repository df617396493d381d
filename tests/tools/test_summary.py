"""The summary tool's command line: JSON output, counts without allocating parameters."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_summary_json_for_b16():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sycoca_jax.tools.summary",
            f"--config={ROOT / 'configs' / 'sycoca.py'}:size=B/16",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    params = summary["params"]
    assert params["image_encoder"] == 85_797_120
    assert params["total"] == sum(v for k, v in params.items() if k != "total")
    assert set(params) >= {
        "image_encoder",
        "text_encoder",
        "multimodal_decoder",
        "poolers",
        "tgmim_decoder",
        "total",
    }
    assert 100e9 < summary["flops_per_example"] < 150e9


def test_summary_rejects_unknown_config_key():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sycoca_jax.tools.summary",
            f"--config={ROOT / 'configs' / 'sycoca.py'}:tiny",
            "--config.model.widht=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "widht" in result.stderr
