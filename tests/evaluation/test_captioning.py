"""The captioning evaluator end to end on the small shapes build, on an 8-device mesh: a model
whose weights spell a known caption, and a random model checked against decoding directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import decoding, sharding
from sycoca_jax.data.tokenizer import BOS_ID, EOS_ID, load_tokenizer
from sycoca_jax.evaluation import caption_metrics, captioning, common
from tests.helpers import SMALL_NAME, tiny_config

NUM_TEST = 40  # images in the small build's test split


def eval_config(**fields) -> captioning.Settings:
    entry = dict(
        dataset=SMALL_NAME,
        split="test",
        batch_size=16,  # 3 batches of 16 over 8 devices; the last has 8 padding rows
        decode="greedy",
        print_examples=3,
        metrics=("bleu", "cider"),
        tokenizer="python",
    )
    entry.update(fields)
    return captioning.Settings(**entry)


def spelling_params(params, ids, scale: float = 5.0):
    """Real SyCoCa weights that caption every image ``ids``: the blocks' residual writes are
    zeroed, so the logits read only the current token, and the token embedding and logit table
    form the chain bos -> ids... -> eos (one embedding dimension per link)."""
    chain = [BOS_ID, *ids, EOS_ID]

    def zero_writes(path, x):
        names = [getattr(k, "key", None) for k in path]
        towers = names[0] in ("text_encoder", "multimodal_decoder")
        return jnp.zeros_like(x) if towers and ("out" in names or "fc2" in names) else x

    p = jax.tree_util.tree_map_with_path(zero_writes, params)
    vocab, width = p["text_encoder"]["token_embedding"]["embedding"].shape
    assert len(set(chain)) == len(chain) and len(chain) <= width
    embedding, kernel = np.zeros((vocab, width), np.float32), np.zeros((width, vocab), np.float32)
    for i, (token, following) in enumerate(zip(chain, chain[1:], strict=False)):
        embedding[token, i] = 1.0
        kernel[i, following] = scale
    text = dict(p["text_encoder"], pos_embedding=jnp.zeros_like(p["text_encoder"]["pos_embedding"]))
    text["token_embedding"] = {"embedding": jnp.asarray(embedding)}
    logits = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((vocab,), jnp.float32)}
    return {
        **p,
        "text_encoder": text,
        "multimodal_decoder": {**p["multimodal_decoder"], "logits": logits},
    }


@pytest.fixture(scope="module")
def setup(data_dir, tiny_model, tiny_params):
    config = tiny_config(data_dir)
    placement = sharding.Placement.from_config(config.mesh)

    def context(params, model=tiny_model):
        return common.EvalContext.for_model(model, params, config, placement)

    # The split as the evaluator sees it (real rows, in order): images and references.
    images, references = [], []
    for batch in common.batches(context(tiny_params), eval_config(), "captioning"):
        for row in np.flatnonzero(batch["mask"]):
            images.append(batch["image"][row])
            references.append(
                [
                    str(c)
                    for c, ok in zip(
                        batch["captions"][row], batch["caption_mask"][row], strict=True
                    )
                    if ok
                ]
            )
    assert len(images) == NUM_TEST
    return context, np.stack(images), references, load_tokenizer(None, config.data.name)


def test_spelled_caption_comes_out_exactly(setup, tiny_params):
    context, _, references, tokenizer = setup
    # A reference of the first image whose pieces are all distinct (the chain needs that).
    sentence = next(
        r for r in references[0] if len(set(tokenizer.encode(r))) == len(tokenizer.encode(r))
    )
    params = spelling_params(tiny_params, tokenizer.encode(sentence))

    result = captioning.run(
        context(params), eval_config(decode="beam", num_beams=3, length_penalty=0.6)
    )
    assert result["num_images"] == NUM_TEST and result["decode"] == "beam"
    assert [e["prediction"] for e in result["examples"]] == [sentence] * 3
    assert result["examples"][1]["references"] == references[1]
    expected = caption_metrics.score_captions(
        [sentence] * NUM_TEST, references, metrics=("bleu", "cider"), tokenizer="python"
    )
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    assert result["captions_per_sec"] > 0

    # The first image alone: its caption is one of its references, so BLEU is 1.
    first = captioning.run(context(params), eval_config(num_examples=1))
    assert first["num_images"] == 1 and first["examples"][0]["prediction"] == sentence
    for n in range(1, 5):
        assert first[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)


def test_random_model_matches_direct_decoding(setup, tiny_model, tiny_params):
    """Predictions stay aligned with their images and references through batching, padding
    rows, sharding and the num_examples cut."""
    context, images, references, tokenizer = setup
    n, max_len = 24, 10
    result = captioning.run(
        context(tiny_params), eval_config(num_examples=n, max_len=max_len, print_examples=n)
    )
    settings = dict(method="greedy", max_len=max_len, num_tokens=tokenizer.vocab_size)
    decode = jax.jit(lambda p, x: decoding.caption_images(tiny_model, p, x, **settings).tokens)
    tokens = np.asarray(decode(tiny_params, jnp.asarray(images[:n])))
    # The model's vocabulary (512) is padded past the tokenizer's; those ids are never emitted.
    assert tokenizer.vocab_size < tiny_model.vocab_size and tokens.max() < tokenizer.vocab_size
    predictions = [tokenizer.decode(t) for t in tokens]
    assert [e["prediction"] for e in result["examples"]] == predictions
    assert [e["references"] for e in result["examples"]] == references[:n]
    assert len(set(predictions)) > 1  # captions differ between images
    expected = caption_metrics.score_captions(
        predictions, references[:n], metrics=("bleu", "cider"), tokenizer="python"
    )
    assert {k: result[k] for k in expected} == pytest.approx(expected)


def test_bad_settings_fail_early(setup, tiny_model, tiny_params):
    context = setup[0]
    with pytest.raises(ValueError, match="decode"):
        eval_config(decode="nucleus")
    with pytest.raises(ValueError, match="metrics"):
        eval_config(metrics=("rouge",))
    with pytest.raises(ValueError, match="top_p"):
        eval_config(top_p=0.0)
    eval_config(decode="sample", top_k=5, top_p=0.9)
    with pytest.raises(ValueError, match="max_text_len"):
        captioning.run(context(tiny_params), eval_config(max_len=tiny_model.max_text_len + 1))
