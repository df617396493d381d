"""The ablation's report: ``ablation.json``, ``ablation.md`` and ``ablation.png`` from the
finished runs' records (``sycoca_jax.tools.ablate``)."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

from sycoca_jax.tools import ablation_stats

# (metric, header, scale, digits) of the main table; retrieval as in the paper's Table 5.
HEADLINE = (
    ("retrieval/mean_recall", "mean recall %", 100, 1),
    ("retrieval/image_to_text_mean_recall", "I→T %", 100, 1),
    ("retrieval/text_to_image_mean_recall", "T→I %", 100, 1),
    ("zeroshot/top1", "zero-shot top-1 %", 100, 1),
    ("captioning/cider", "CIDEr", 1, 2),
    ("captioning/bleu_4", "BLEU-4", 1, 3),
)
MECHANISM = (
    ("mechanism/relevance_auroc", "relevance AUROC (0.5)", 1, 2),
    ("mechanism/caption_keep_precision", "keep precision", 1, 2),
    ("mechanism/random_caption_keep_precision", "(random)", 1, 2),
    ("mechanism/tgmim_mask_recall", "mask recall", 1, 2),
    ("mechanism/random_tgmim_mask_recall", "(random)", 1, 2),
    ("mechanism/colour_word_hit", "colour word hit", 1, 2),
    ("mechanism/random_colour_word_hit", "(random)", 1, 2),
    ("mechanism/colour_word_hit_given_object", "… given on a shape", 1, 2),
    ("mechanism/random_colour_word_hit_given_object", "(random)", 1, 2),
)
LOSSES = (
    ("train/loss/itc", "ITC loss", 1, 3),
    ("train/loss/caption", "caption loss", 1, 3),
    ("train/loss/tgmim", "TG-MIM loss", 1, 3),
)
CURVE_METRIC = "eval/shapes_mechanism/relevance_auroc"


def last_train_metrics(path: pathlib.Path) -> dict[str, float]:
    """The loss terms of the last logged training step of a ``metrics.jsonl``."""
    if not path.exists():
        return {}
    last: dict[str, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "loss" in record:
            last = {k: v for k, v in record.items() if k == "step" or k.startswith("loss")}
    return last


def curve(path: pathlib.Path, metric: str = CURVE_METRIC) -> dict[int, float]:
    """``{step: value}`` of an evaluation metric over training, from a run's ``metrics.jsonl``."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if isinstance(record.get(metric), (int, float)):
            out[int(record["step"])] = float(record[metric])
    return out


def flatten(record: dict[str, Any]) -> dict[str, float]:
    """A run's numeric results as ``{"<entry without shapes_>/<metric>": value}`` plus
    ``train/<loss>``."""
    out = {}
    for entry, metrics in record["results"].items():
        short = entry.removeprefix("shapes_")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                out[f"{short}/{key}"] = float(value)
    for key, value in record.get("train", {}).items():
        if key != "step" and isinstance(value, (int, float)):
            out[f"train/{key}"] = float(value)
    return out


def collect(records: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """``{variant: {seed: metrics}}``, variants in the order they first appear."""
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for record in records:
        spec = record["spec"]
        runs.setdefault(spec["variant"], {})[int(spec["seed"])] = flatten(record)
    return runs


def _interval_json(interval: ablation_stats.Interval) -> dict[str, Any]:
    half = interval.half_width
    return {"mean": interval.mean, "ci95": half if math.isfinite(half) else None, "n": interval.n}


def write_report(
    records: Sequence[dict[str, Any]], workdir: str, baseline: str = "coca", name: str = "ablation"
) -> list[pathlib.Path]:
    """Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``workdir``."""
    root = pathlib.Path(workdir)
    runs = collect(records)
    summary = ablation_stats.summarise(runs, baseline if baseline in runs else None)
    curves = {}
    for record in records:
        spec = record["spec"]
        run_dir = root / spec["variant"] / f"seed{spec['seed']}"
        curves.setdefault(spec["variant"], {})[spec["seed"]] = curve(run_dir / "metrics.jsonl")
    json_path = root / f"{name}.json"
    json_path.write_text(
        json.dumps(
            {
                "baseline": baseline,
                "runs": [
                    {"spec": r["spec"], "metrics": flatten(r), "results": r["results"]}
                    for r in records
                ],
                "summary": {
                    variant: {
                        metric: {k: _interval_json(v) for k, v in entry.items()}
                        for metric, entry in by_metric.items()
                    }
                    for variant, by_metric in summary.items()
                },
                "relevance_auroc_over_steps": curves,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    md_path = root / f"{name}.md"
    md_path.write_text(markdown(records, summary, curves, baseline))
    png_path = root / f"{name}.png"
    chart(summary, png_path, baseline)
    return [json_path, md_path, png_path]


def _columns(spec: Sequence[tuple[str, str, float, int]], summary) -> list:
    present = {m for by_metric in summary.values() for m in by_metric}
    return [c for c in spec if c[0] in present]


def _table(summary, columns, key: str = "value") -> str:
    if not columns:
        return "(no runs report these metrics)"
    return ablation_stats.markdown_table(summary, columns, key=key)


def markdown(records, summary, curves, baseline: str) -> str:
    specs = [r["spec"] for r in records]
    seeds = sorted({s["seed"] for s in specs})
    first = specs[0] if specs else {}
    lines = [
        "# Ablation (SyCoCa Table 5 rows)",
        "",
        f"data `{first.get('data')}`, size `{first.get('size')}`, steps "
        f"`{first.get('steps') or 'config default'}`, seeds {seeds}. Mean ± half-width of the "
        "95 % Student-t interval over seeds (none with one seed).",
        "",
        "## Downstream",
        "",
        _table(summary, _columns(HEADLINE, summary)),
        "",
        f"## Paired difference from `{baseline}` (same seed)",
        "",
        "Bold: the 95 % interval excludes 0.",
        "",
        _table(summary, _columns(HEADLINE, summary), key="vs_baseline"),
        "",
        "## Mechanism (test split; random = expected value of random selection)",
        "",
        _table(summary, _columns(MECHANISM, summary)),
        "",
        "## Final training losses",
        "",
        _table(summary, _columns(LOSSES, summary)),
        "",
    ]
    steps = sorted({step for by_seed in curves.values() for c in by_seed.values() for step in c})
    if steps:
        lines += [
            "## Relevance AUROC over training (mean over seeds; 0.5 = chance)",
            "",
            "| variant | " + " | ".join(str(s) for s in steps) + " |",
            "|" + "---|" * (len(steps) + 1),
        ]
        for variant, by_seed in curves.items():
            cells = []
            for step in steps:
                values = [c[step] for c in by_seed.values() if step in c]
                cells.append(f"{sum(values) / len(values):.2f}" if values else "–")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def chart(summary, path: pathlib.Path, baseline: str) -> None:
    """Bars of the headline and mechanism metrics per variant with their 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = (
        _columns(HEADLINE, summary)[:4]
        + [c for c in _columns(MECHANISM, summary) if "random" not in c[0]][:3]
    )
    if not columns:
        columns = [("none", "no metrics", 1, 1)]
    variants = list(summary)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 0.5 * len(variants) + 2))
    axes = [axes] if len(columns) == 1 else list(axes)
    for ax, (metric, header, scale, _) in zip(axes, columns, strict=True):
        means, errors, colours = [], [], []
        for variant in variants:
            interval = summary[variant].get(metric, {}).get("value")
            mean = interval.mean * scale if interval else float("nan")
            half = interval.half_width * scale if interval else float("nan")
            means.append(mean)
            errors.append(half if math.isfinite(half) else 0.0)
            colours.append("tab:grey" if variant == baseline else "tab:blue")
        ax.barh(range(len(variants)), means, xerr=errors, color=colours, capsize=3)
        random_key = metric.replace("mechanism/", "mechanism/random_")
        reference = 0.5 if metric.endswith("relevance_auroc") else None
        if reference is None and random_key != metric:
            values = [
                summary[v][random_key]["value"].mean for v in variants if random_key in summary[v]
            ]
            reference = sum(values) / len(values) if values else None
        if reference is not None:
            ax.axvline(reference * scale, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(header, fontsize=9)
        ax.set_yticks(range(len(variants)))
        ax.set_yticklabels(variants if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
    fig.suptitle("mean ± 95 % t interval over seeds; red: random selection", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
