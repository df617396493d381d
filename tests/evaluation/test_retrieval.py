"""Retrieval recall on planted similarities, against a brute-force reference."""

from __future__ import annotations

import numpy as np

from sycoca_jax.evaluation import retrieval


def _planted(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings whose image·text products are exactly ``similarity`` (images one-hot)."""
    return np.eye(similarity.shape[0], dtype=np.float32), similarity.T.astype(np.float32)


def _brute_force(sim: np.ndarray, owners: np.ndarray) -> dict[str, float]:
    out = {}
    i2t, t2i = [], []
    for i in range(sim.shape[0]):
        order = np.argsort(-sim[i], kind="stable")
        i2t.append(min(np.where(owners[order] == i)[0]))
    for t in range(sim.shape[1]):
        order = np.argsort(-sim[:, t], kind="stable")
        t2i.append(int(np.where(order == owners[t])[0][0]))
    for k in retrieval.KS:
        out[f"image_to_text_r{k}"] = np.mean(np.array(i2t) < k)
        out[f"text_to_image_r{k}"] = np.mean(np.array(t2i) < k)
    return out


def test_planted_similarity_gives_known_recalls():
    # 3 images, 2 captions each (owners 0,0,1,1,2,2).
    owners = np.array([0, 0, 1, 1, 2, 2])
    sim = np.array(
        [
            [0.9, 0.1, 0.8, 0.0, 0.2, 0.3],  # image 0: own caption 0 first -> rank 0
            [0.95, 0.2, 0.1, 0.3, 0.0, 0.1],  # image 1: best own (0.3) beaten by 0.95 -> rank 1
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.05],  # image 2: own 0.5 is the top -> rank 0
        ]
    )
    images, texts = _planted(sim)
    metrics = retrieval.rank_metrics(images, texts, owners)
    assert metrics["image_to_text_r1"] == 2 / 3
    assert metrics["image_to_text_r5"] == 1.0
    # Captions: t0 own image 0 has 0.9 < 0.95 (image 1) -> rank 1; t1 rank 1; t2 rank 1 (0.8 >
    # 0.1); t3 rank 1 (0.4 > 0.3); t4 rank 0; t5 rank 1 (0.3 > 0.05).
    assert metrics["text_to_image_r1"] == 1 / 6
    assert metrics["text_to_image_r5"] == 1.0
    assert np.isclose(metrics["mean_recall"], (2 / 3 + 1 + 1 + 1 / 6 + 1 + 1) / 6)


def test_chunked_ranks_match_brute_force():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(37, 16)).astype(np.float32)
    owners = np.repeat(np.arange(37), 3)
    texts = images[owners] + rng.normal(scale=1.5, size=(len(owners), 16)).astype(np.float32)
    sim = images @ texts.T
    got = retrieval.rank_metrics(images, texts, owners, chunk=5)
    for key, value in _brute_force(sim, owners).items():
        assert np.isclose(got[key], value), key
