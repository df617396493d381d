"""Confidence intervals of the ablation against textbook results."""

from __future__ import annotations

import math

import pytest

from sycoca_jax.tools import ablation_stats

# Student (1908) / Cushny & Peebles: extra hours of sleep under two drugs, ten patients (R's
# `sleep` data). The paired t-test (R: t.test(extra ~ group, data = sleep, paired = TRUE))
# gives mean difference -1.58 and 95 % interval (-2.4598858, -0.7001142); t_{0.975, 9} = 2.262.
DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_interval_of_students_sleep_data():
    by_seed_1 = dict(enumerate(DRUG_1))
    by_seed_2 = dict(enumerate(DRUG_2))
    diff = ablation_stats.paired_difference(by_seed_1, by_seed_2)
    assert diff.n == 10
    assert diff.mean == pytest.approx(-1.58)
    assert diff.low == pytest.approx(-2.4598858, abs=1e-6)
    assert diff.high == pytest.approx(-0.7001142, abs=1e-6)
    assert diff.excludes_zero()


def test_t_interval_uses_the_t_quantile():
    # Three values 1, 2, 3: s = 1, t_{0.975, 2} = 4.302653.
    interval = ablation_stats.t_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0
    assert interval.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    assert math.isnan(ablation_stats.t_interval([5.0]).half_width)
    assert ablation_stats.t_interval([]).n == 0
    assert ablation_stats.t_interval([1.0, float("nan"), 3.0]).n == 2


def test_summary_pairs_by_seed_and_formats():
    runs = {
        "coca": {0: {"m": 0.30}, 1: {"m": 0.20}, 2: {"m": 0.25}},
        "sycoca": {0: {"m": 0.32}, 1: {"m": 0.22}, 2: {"m": 0.27}, 3: {"m": 0.9}},
    }
    summary = ablation_stats.summarise(runs, baseline="coca")
    assert "vs_baseline" not in summary["coca"]["m"]
    diff = summary["sycoca"]["m"]["vs_baseline"]
    assert diff.n == 3 and diff.mean == pytest.approx(0.02) and diff.half_width == pytest.approx(0)
    assert summary["sycoca"]["m"]["value"].n == 4
    table = ablation_stats.markdown_table(summary, [("m", "M %", 100, 1)], key="vs_baseline")
    assert "| sycoca | **+2.0 ± 0.0** |" in table
    values = ablation_stats.markdown_table(summary, [("m", "M %", 100, 1)])
    assert "| coca | 25.0 ± 12.4 |" in values  # s = 0.05, t = 4.30: 0.05 * 4.30 / sqrt(3)
