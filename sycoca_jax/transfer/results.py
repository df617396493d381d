"""What a transfer run reports: accuracies, their chance levels, and ``transfer_results.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from sycoca_jax.metrics import MetricWriter

RESULTS_FILE = "transfer_results.json"


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` (a k above the number of classes is left out)."""
    labels = np.asarray(labels)
    order = np.argsort(-np.asarray(logits), axis=-1)
    out = {}
    for k in ks:
        if k <= order.shape[-1]:
            out[f"top{k}"] = float(np.mean(np.any(order[:, :k] == labels[:, None], axis=-1)))
    return out


def classification_baselines(train_counts: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Chance: uniform guessing over all classes, and always answering the most frequent
    training class."""
    return {
        "uniform": 1.0 / len(train_counts),
        "majority_class": float(np.mean(np.asarray(labels) == int(np.argmax(train_counts)))),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(workdir: str, results: Mapping[str, Any]) -> str:
    """Writes ``<workdir>/transfer_results.json`` (process 0 only); returns its path."""
    path = epath.Path(workdir) / RESULTS_FILE
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_plain(results), indent=2) + "\n")
    return str(path)


def read_results(workdir: str) -> dict[str, Any]:
    return json.loads((epath.Path(workdir) / RESULTS_FILE).read_text())


def write_metrics(workdir: str, step: int, metrics: Mapping[str, Any]) -> None:
    """One record of evaluation numbers appended to ``metrics.jsonl`` (and TensorBoard)."""
    writer = MetricWriter(workdir)
    writer.write(step, metrics)
    writer.close()
