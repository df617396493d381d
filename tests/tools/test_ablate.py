"""The one-command ablation: variants, configs, resuming, and a short end-to-end study."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.tools import ablate
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
    name, (objective, overrides) = ablate.parse_variant(
        "keep25:sycoca,model.caption_keep_ratio=0.25,model.score_mode=attention"
    )
    assert (name, objective) == ("keep25", "sycoca")
    assert overrides == {"model.caption_keep_ratio": 0.25, "model.score_mode": "attention"}
    with pytest.raises(ValueError, match="NAME:OBJECTIVE"):
        ablate.parse_variant("keep25")
    chosen = ablate.select_variants([], ["keep25:sycoca,model.caption_keep_ratio=0.25"])
    assert list(chosen) == [*ablate.TABLE5, "keep25"]
    with pytest.raises(ValueError, match="unknown variants"):
        ablate.select_variants(["cocaa"], [])


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
def test_two_variants_one_seed_end_to_end(data_dir, tmp_path, monkeypatch):
    """2 variants x 1 seed x 3 steps in this process, then the resumed study skips both."""
    from sycoca_jax.tools import ablation_report

    variants = ablate.select_variants(["clip", "coca"], [])
    common = {
        "data.name": SMALL_NAME,
        "data.data_dir": data_dir,
        "data.num_workers": 0,
        "batch_size": 16,
    }
    specs = ablate.make_specs(
        variants,
        1,
        data="shapes",
        size="tiny",
        steps=3,
        mechanism_every=3,
        common_overrides=common,
        config_file=str(ROOT / "configs" / "sycoca.py"),
        evals=("mechanism",),
        eval_every=0,
    )
    root = str(tmp_path)
    assert ablate.run_all(specs, root, parallel=0) == []
    records = [ablate.finished(s, root) for s in specs]
    assert [r["spec"]["variant"] for r in records] == ["clip", "coca"]
    paths = ablation_report.write_report(records, root)
    summary = json.loads(paths[0].read_text())["summary"]
    auroc = summary["coca"]["mechanism/relevance_auroc"]["value"]
    assert auroc["n"] == 1 and 0 <= auroc["mean"] <= 1 and auroc["ci95"] is None
    assert "vs_baseline" in summary["clip"]["mechanism/relevance_auroc"]
    assert "| coca |" in paths[1].read_text()
    assert np.asarray(Image.open(paths[2])).ndim == 3
    monkeypatch.setattr(ablate, "run_one", lambda *a: pytest.fail("a finished run ran again"))
    assert ablate.run_all(specs, root, parallel=0) == []
