"""The one-command ablation: variants, configs, resuming, and a short end-to-end study."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.tools import ablate, ablation_variants
from tests.helpers import ROOT, SMALL_NAME


def _spec(**changes):
    fields = dict(
        variant="coca",
        seed=1,
        objective="coca",
        overrides={},
        data="shapes",
        size="tiny",
        steps=20,
        config_file=str(ROOT / "configs" / "sycoca.py"),
        mechanism_every=10,
        eval_every=0,
    )
    return ablate.RunSpec(**{**fields, **changes})


def test_variant_definitions_parse_and_unknown_ones_fail():
    name, (objective, overrides) = ablation_variants.parse_variant(
        "keep25:sycoca,model.caption_keep_ratio=0.25,model.score_mode=attention"
    )
    assert (name, objective) == ("keep25", "sycoca")
    assert overrides == {"model.caption_keep_ratio": 0.25, "model.score_mode": "attention"}
    with pytest.raises(ValueError, match="NAME:OBJECTIVE"):
        ablation_variants.parse_variant("keep25")
    chosen = ablation_variants.select_variants([], ["keep25:sycoca,model.caption_keep_ratio=0.25"])
    assert list(chosen) == [*ablation_variants.TABLE5, "keep25"]
    with pytest.raises(ValueError, match="unknown variants"):
        ablation_variants.select_variants(["cocaa"], [])


def test_run_configs_follow_the_spec():
    config = ablate.build_config(_spec(overrides={"model.caption_masking": "attentive"}))
    assert config.seed == 1 and config.data.shuffle_seed == 1 and config.total_steps == 20
    assert config.model.caption_masking == "attentive" and not config.model.use_tgmim
    kinds = {e.kind: e.every_steps for e in config.evals.values()}
    assert kinds["mechanism"] == 10 and kinds["retrieval"] == 20  # others only at the end
    clip = ablate.build_config(_spec(variant="clip", objective="clip"))
    assert "captioning" not in {e.kind for e in clip.evals.values()}
    with pytest.raises(KeyError, match="no field 'caption_kept'"):
        ablate.build_config(_spec(overrides={"model.caption_kept": 0.5}))


def test_a_finished_run_of_another_spec_is_refused(tmp_path):
    spec = _spec()
    spec.workdir(tmp_path).mkdir(parents=True)
    record = {"spec": _spec(steps=10).identity(), "results": {}}
    (spec.workdir(tmp_path) / ablate.DONE_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="another --workdir"):
        ablate.finished(spec, str(tmp_path))
    assert ablate.finished(_spec(seed=2), str(tmp_path)) is None


@pytest.mark.slow
def test_two_variants_one_seed_through_the_cli(data_dir, tmp_path):
    """2 variants x 1 seed x 3 steps, one CPU device; the resumed study skips both runs."""
    root = tmp_path / "study"
    command = [
        sys.executable, "-m", "sycoca_jax.tools.ablate", f"--workdir={root}", "--data=shapes",
        "--seeds=1", "--variants=clip,coca", "--steps=3", "--evals=mechanism",
        "--mechanism_every=3", "--eval_every=0", "--parallel=0",
        f"--set=data.name={SMALL_NAME}", f"--set=data.data_dir={data_dir}",
        "--set=data.num_workers=0", "--set=batch_size=16", "--set=model.image_depth=1",
        "--set=model.text_depth=1", "--set=model.multimodal_depth=1",
    ]  # fmt: skip
    # One CPU device (not the 8 fake ones of the test session): smaller programs to compile.
    flags = " ".join(
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((root / "ablation.json").read_text())
    assert [r["spec"]["variant"] for r in report["runs"]] == ["clip", "coca"]
    auroc = report["summary"]["coca"]["mechanism/relevance_auroc"]["value"]
    assert auroc["n"] == 1 and 0 <= auroc["mean"] <= 1 and auroc["ci95"] is None
    assert "vs_baseline" in report["summary"]["clip"]["mechanism/relevance_auroc"]
    assert "| coca |" in (root / "ablation.md").read_text()
    assert np.asarray(Image.open(root / "ablation.png")).ndim == 3
    done_files = sorted(root.glob("*/seed0/" + ablate.DONE_FILE))
    checkpoints = sorted(str(p) for p in root.glob("*/seed0/checkpoints/*"))
    stamps = [p.stat().st_mtime_ns for p in done_files]
    # Again, asking for the mechanism evaluation anew: nothing trains, the records are updated.
    again = subprocess.run(
        [*command, "--reevaluate=mechanism"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 2 runs already finished" in again.stderr
    assert sorted(str(p) for p in root.glob("*/seed0/checkpoints/*")) == checkpoints
    assert all(p.stat().st_mtime_ns > t for p, t in zip(done_files, stamps, strict=True))
    record = json.loads(done_files[0].read_text())
    assert record["results"]["shapes_mechanism"]["step"] == 3
