"""Statistics of an ablation: mean and Student-t confidence interval per variant and metric, and
each variant's paired difference from a baseline run with the same seed.

With few seeds the t quantile matters (t_{0.975, 2} = 4.30 against the normal's 1.96), so the
intervals are wide and honest. Pure functions of ``{variant: {seed: {metric: value}}}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

Runs = Mapping[str, Mapping[int, Mapping[str, float]]]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with the half-width of its confidence interval (NaN with fewer than 2 values)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        return math.isfinite(self.half_width) and (self.low > 0 or self.high < 0)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n), s the sample standard deviation."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    n = len(x)
    if n == 0:
        return Interval(float("nan"), float("nan"), 0)
    if n == 1:
        return Interval(float(x[0]), float("nan"), 1)
    quantile = stats.t.ppf((1 + confidence) / 2, df=n - 1)
    return Interval(float(x.mean()), float(quantile * x.std(ddof=1) / math.sqrt(n)), n)


def paired_difference(
    values: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95
) -> Interval:
    """t interval of ``values[seed] - baseline[seed]`` over the seeds both have."""
    seeds = sorted(set(values) & set(baseline))
    return t_interval([values[s] - baseline[s] for s in seeds], confidence)


def metric_names(runs: Runs) -> list[str]:
    """Every metric some run reports, in first-seen order."""
    names: dict[str, None] = {}
    for by_seed in runs.values():
        for metrics in by_seed.values():
            names.update(dict.fromkeys(k for k, v in metrics.items() if _is_number(v)))
    return list(names)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _column(by_seed: Mapping[int, Mapping[str, float]], metric: str) -> dict[int, float]:
    return {
        seed: float(m[metric])
        for seed, m in by_seed.items()
        if _is_number(m.get(metric)) and math.isfinite(m[metric])
    }


def summarise(
    runs: Runs, baseline: str | None = "coca", confidence: float = 0.95
) -> dict[str, dict[str, dict[str, Interval]]]:
    """``{variant: {metric: {"value": Interval, "vs_baseline": Interval}}}``; ``vs_baseline``
    only where the baseline ran and reports the metric."""
    out: dict[str, dict[str, dict[str, Interval]]] = {}
    base = runs.get(baseline) if baseline else None
    for variant, by_seed in runs.items():
        out[variant] = {}
        for metric in metric_names(runs):
            column = _column(by_seed, metric)
            if not column:
                continue
            entry = {"value": t_interval(list(column.values()), confidence)}
            if base is not None and variant != baseline:
                base_column = _column(base, metric)
                if base_column:
                    entry["vs_baseline"] = paired_difference(column, base_column, confidence)
            out[variant][metric] = entry
    return out


def format_interval(interval: Interval, scale: float = 1.0, digits: int = 1) -> str:
    """``"27.9 ± 0.3"`` (``scale`` 100 for percentages); ``"27.9"`` with one value."""
    if interval.n == 0:
        return "–"
    mean = f"{interval.mean * scale:.{digits}f}"
    if not math.isfinite(interval.half_width):
        return mean
    return f"{mean} ± {interval.half_width * scale:.{digits}f}"


def markdown_table(
    summary: Mapping[str, Mapping[str, Mapping[str, Interval]]],
    metrics: Sequence[tuple[str, str, float, int]],
    key: str = "value",
) -> str:
    """A markdown table, one row per variant, one column per ``(metric, header, scale,
    digits)``; ``key`` picks the interval (``value`` or ``vs_baseline``). Differences whose
    interval excludes 0 are in bold."""
    header = "| variant | " + " | ".join(h for _, h, _, _ in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for variant, by_metric in summary.items():
        cells = []
        for metric, _, scale, digits in metrics:
            interval = by_metric.get(metric, {}).get(key)
            if interval is None:
                cells.append("–")
                continue
            text = format_interval(interval, scale, digits)
            if key == "vs_baseline":
                text = ("+" if interval.mean > 0 else "") + text
                if interval.excludes_zero():
                    text = f"**{text}**"
            cells.append(text)
        if key == "vs_baseline" and all(c == "–" for c in cells):
            continue
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
