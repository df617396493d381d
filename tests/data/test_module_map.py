"""The data package's docstring maps every module in it (a newcomer's index must be whole)."""

from __future__ import annotations

import re

import sycoca_jax.data
from tests.helpers import ROOT


def test_module_map_lists_every_module():
    listed = set(re.findall(r"^  (\w+)\.py ", sycoca_jax.data.__doc__, flags=re.MULTILINE))
    present = {p.stem for p in (ROOT / "sycoca_jax" / "data").glob("*.py")} - {"__init__"}
    assert listed == present, f"missing: {present - listed}; stale: {listed - present}"
