"""KV-cached decoding: greedy, beam search and sampling against slow references that recompute
the teacher-forced forward (``caption_logits``) on the whole prefix at every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import decoding, decoding_steps
from sycoca_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SENTENCEPIECE_IDS, SpecialIds
from sycoca_jax.models import build, convert

MAX_LEN = 16
MIN_LEN = 2
NUM_IMAGES = 32


def confident(params, logit_scale: float = 4.0, eos_bias: float = 6.0):
    """The tiny model's params with sharper logits and a likely eos, so captions end at varied
    lengths and beam search has real choices (a random init is near uniform, never ends)."""
    logits = dict(params["multimodal_decoder"]["logits"])
    logits["kernel"] = logits["kernel"] * logit_scale
    logits["bias"] = logits["bias"].at[EOS_ID].set(eos_bias)
    return {**params, "multimodal_decoder": {**params["multimodal_decoder"], "logits": logits}}


def jit_generate(model, **static):
    return jax.jit(lambda p, x, **traced: decoding.generate(model, p, x, **static, **traced))


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_params):
    """Model, confident params and image tokens (random: the decoder does not care where they
    come from; the evaluator tests cover ``encode_image``)."""
    shape = (NUM_IMAGES, tiny_model.num_image_tokens, tiny_model.text_width)
    image_tokens = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    return tiny_model, confident(tiny_params), image_tokens


@pytest.fixture(scope="module")
def full_logits(setup):
    """Teacher-forced logits; rows padded to one fixed count so it compiles once."""
    model = setup[0]
    rows = 3 * NUM_IMAGES
    forward = jax.jit(
        lambda p, image_tokens, tokens: model.apply(
            {"params": p}, image_tokens, tokens, method=model.caption_logits
        )[0]
    )

    def run(params, image_tokens, tokens):
        n = tokens.shape[0]
        image_tokens = jnp.concatenate([image_tokens, jnp.repeat(image_tokens[:1], rows - n, 0)])
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], rows - n, 0)])
        return np.asarray(forward(params, image_tokens, tokens))[:n]

    return run


@pytest.fixture(scope="module")
def greedy(setup):
    model, params, image_tokens = setup
    return jit_generate(model, method="greedy", max_len=MAX_LEN, min_len=MIN_LEN)(
        params, image_tokens, length_penalty=0.6
    )


def jit_beam(model, num_beams):
    """Beam search compiled once for every length penalty and stopping rule (both traced)."""
    jitted = jit_generate(
        model, method="beam", num_beams=num_beams, max_len=MAX_LEN, min_len=MIN_LEN
    )

    def beam(params, image_tokens, length_penalty, early_stopping=True):
        return jitted(
            params,
            image_tokens,
            length_penalty=jnp.float32(length_penalty),
            early_stopping=jnp.bool_(early_stopping),
        )

    return beam


@pytest.fixture(scope="module")
def beam1_fn(setup):
    return jit_beam(setup[0], 1)


@pytest.fixture(scope="module")
def beam3_fn(setup):
    return jit_beam(setup[0], 3)


@pytest.fixture(scope="module")
def sample_fn(setup):
    """One compiled sampler for every setting: the knobs are traced arrays of fixed dtype."""
    jitted = jit_generate(setup[0], method="sample", max_len=MAX_LEN, min_len=MIN_LEN)

    def sample(params, image_tokens, seed, temperature=1.0, top_k=0, top_p=1.0):
        return jitted(
            params,
            image_tokens,
            rng=jax.random.key(seed),
            temperature=jnp.float32(temperature),
            top_k=jnp.int32(top_k),
            top_p=jnp.float32(top_p),
        )

    return sample


def _log_softmax(logits, step):
    masked = decoding_steps.mask_logits(logits, step, MIN_LEN, special=SENTENCEPIECE_IDS)
    return np.asarray(jax.nn.log_softmax(masked, axis=-1))


def _padded(seqs, length):
    out = np.full((len(seqs), length), PAD_ID, np.int32)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = seq
    return out


def reference_greedy(model, params, image_tokens, full_logits):
    """Greedy decoding that reruns the full forward on the prefix at every step."""
    n = image_tokens.shape[0]
    seqs, log_prob, done = [[BOS_ID] for _ in range(n)], np.zeros(n), np.zeros(n, bool)
    for t in range(MAX_LEN):
        logits = full_logits(params, image_tokens, _padded(seqs, model.max_text_len + 1))[:, t]
        lp = _log_softmax(logits, t)
        for i in np.flatnonzero(~done):
            token = int(lp[i].argmax())
            seqs[i].append(token)
            log_prob[i] += lp[i, token]
            done[i] = token == EOS_ID
        if done.all():
            break
    return _padded(seqs, MAX_LEN + 1), log_prob


def reference_beam(model, params, image_tokens, full_logits, k, alpha, early_stopping):
    """Beam search with python lists and the full forward: the best 2k extensions per image; an
    eos among the best k finishes a hypothesis, the best k others stay alive; an image is done
    with k finished hypotheses (and, without early stopping, once no alive one can reach the
    worst finished score); at max_len the alive ones finish as they are."""
    n, vocab = image_tokens.shape[0], model.vocab_size
    alive = [[([BOS_ID], 0.0)] for _ in range(n)]
    finished = [[] for _ in range(n)]
    done = [False] * n
    repeated = jnp.repeat(image_tokens, k, axis=0)
    for t in range(MAX_LEN):
        rows = [
            alive[i][j][0] if j < len(alive[i]) else [BOS_ID] for i in range(n) for j in range(k)
        ]
        logits = full_logits(params, repeated, _padded(rows, model.max_text_len + 1))[:, t]
        lp = _log_softmax(logits, t).reshape(n, k, vocab)
        for i in range(n):
            if done[i]:
                continue
            totals = np.array([a for _, a in alive[i]])[:, None] + lp[i, : len(alive[i])]
            flat = totals.reshape(-1)
            order = np.argsort(-flat, kind="stable")[: 2 * k]
            new_alive = []
            for rank, index in enumerate(order):
                j, token = divmod(int(index), vocab)
                seq, total = alive[i][j][0] + [token], float(flat[index])
                if token == EOS_ID:
                    if rank < k:
                        finished[i].append((total / (t + 1) ** alpha, seq, total))
                elif len(new_alive) < k:
                    new_alive.append((seq, total))
            if t + 1 == MAX_LEN:
                finished[i] += [(total / (t + 1) ** alpha, seq, total) for seq, total in new_alive]
            finished[i] = sorted(finished[i], key=lambda f: -f[0])[:k]
            alive[i] = new_alive
            settled = len(finished[i]) == k
            if settled and not early_stopping:
                reach = MAX_LEN if alpha >= 0 else min(t + 2, MAX_LEN)
                bound = max(total for _, total in new_alive) / reach**alpha
                settled = bound <= min(score for score, _, _ in finished[i])
            done[i] = settled or t + 1 == MAX_LEN
        if all(done):
            break
    best = [f[0] for f in finished]
    return (
        _padded([seq for _, seq, _ in best], MAX_LEN + 1),
        np.array([s for s, _, _ in best]),
        np.array([lp for _, _, lp in best]),
    )


def teacher_forced_log_prob(model, params, image_tokens, full_logits, tokens):
    """Sum of the masked log-probs of each generated token (eos included)."""
    tokens = np.asarray(tokens)
    full = np.zeros((tokens.shape[0], model.max_text_len + 1), np.int32)
    full[:, : tokens.shape[1]] = tokens
    logits = full_logits(params, image_tokens, full)
    total = np.zeros(tokens.shape[0])
    for t in range(MAX_LEN):
        lp = _log_softmax(logits[:, t], t)
        target = tokens[:, t + 1]
        total += np.where(target != PAD_ID, lp[np.arange(len(target)), target], 0.0)
    return total


def penalised(captions, penalty):
    """Length-penalised scores of decoded captions (greedy's tokens do not depend on it)."""
    length = np.asarray(captions.length).astype(np.float32)
    return np.asarray(captions.log_prob) / length**penalty


def check_layout(captions):
    """[bos, words..., eos, pad...]: nothing but pad after eos; length counts up to eos."""
    tokens, length = np.asarray(captions.tokens), np.asarray(captions.length)
    assert tokens.shape == (NUM_IMAGES, MAX_LEN + 1) and tokens.dtype == np.int32
    assert (tokens[:, 0] == BOS_ID).all()
    for row, n in zip(tokens, length, strict=True):
        eos = np.flatnonzero(row == EOS_ID)
        assert not np.isin(row[1 : n + 1], [PAD_ID, BOS_ID]).any()
        if len(eos):
            assert eos[0] == n and (row[n + 1 :] == PAD_ID).all()
            assert n > MIN_LEN  # eos is banned before MIN_LEN tokens
        else:
            assert n == MAX_LEN


# ------------------------------------------------------------------------------------ greedy
def test_greedy_cached_equals_uncached(setup, full_logits, greedy):
    model, params, image_tokens = setup
    tokens, log_prob = reference_greedy(model, params, image_tokens, full_logits)
    np.testing.assert_array_equal(greedy.tokens, tokens)
    np.testing.assert_allclose(greedy.log_prob, log_prob, rtol=1e-4, atol=1e-4)
    check_layout(greedy)
    lengths = np.asarray(greedy.length)
    assert (lengths < MAX_LEN).any() and (lengths == MAX_LEN).any()  # both ends exercised
    expected = np.asarray(greedy.log_prob) / lengths.astype(np.float32) ** 0.6
    np.testing.assert_allclose(greedy.score, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------ beam
def test_beam_with_one_beam_is_greedy(setup, greedy, beam1_fn):
    _, params, image_tokens = setup
    for penalty in (0.0, 0.6, 2.0):
        beam = beam1_fn(params, image_tokens, penalty)
        np.testing.assert_array_equal(beam.tokens, greedy.tokens, err_msg=f"penalty {penalty}")
        np.testing.assert_allclose(beam.log_prob, greedy.log_prob, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(beam.length, greedy.length)
    # Exact stopping with no length penalty is greedy too.
    exact = beam1_fn(params, image_tokens, 0.0, early_stopping=False)
    np.testing.assert_array_equal(exact.tokens, greedy.tokens)


@pytest.mark.parametrize("penalty, early_stopping", [(0.6, True), (0.0, True), (1.0, False)])
def test_beam_cached_equals_uncached(setup, full_logits, beam3_fn, penalty, early_stopping):
    model, params, image_tokens = setup
    beam = beam3_fn(params, image_tokens, penalty, early_stopping)
    tokens, score, log_prob = reference_beam(
        model, params, image_tokens, full_logits, 3, penalty, early_stopping
    )
    np.testing.assert_array_equal(beam.tokens, tokens)
    np.testing.assert_allclose(beam.score, score, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(beam.log_prob, log_prob, rtol=1e-4, atol=1e-4)
    check_layout(beam)
    assert (np.asarray(beam.length) < MAX_LEN).any()  # finished at eos, padded after it


def test_one_beam_exact_search_never_scores_below_greedy(setup, full_logits, greedy, beam1_fn):
    """A guarantee: with one beam, greedy's caption is the first finished hypothesis of the exact
    search, and only a better-scored one replaces it; with a length penalty it finds some."""
    model, params, image_tokens = setup
    for penalty in (0.6, 1.0):
        greedy_score = penalised(greedy, penalty)
        exact = beam1_fn(params, image_tokens, penalty, early_stopping=False)
        assert (np.asarray(exact.score) >= greedy_score - 1e-5).all(), penalty
    assert (np.asarray(exact.score) > greedy_score + 1e-3).any()
    recomputed = teacher_forced_log_prob(model, params, image_tokens, full_logits, exact.tokens)
    np.testing.assert_allclose(exact.log_prob, recomputed, rtol=1e-4, atol=1e-4)


def test_three_beams_usually_beat_greedy(setup, greedy, beam3_fn):
    """Not a theorem for more beams (greedy's prefix can be pruned: ~2% of images on this model
    score lower), but what beam search is for: higher length-penalised scores on most images and
    on average, with either stopping rule."""
    _, params, image_tokens = setup
    greedy_score = penalised(greedy, 0.6)
    for early_stopping in (True, False):
        beam = np.asarray(beam3_fn(params, image_tokens, 0.6, early_stopping).score)
        assert np.mean(beam >= greedy_score - 1e-5) >= 0.9
        assert np.mean(beam > greedy_score + 1e-3) >= 0.5
        assert beam.mean() > greedy_score.mean()


def test_scanned_blocks_decode_the_same(setup, beam3_fn):
    """Beam search with scanned blocks (cache leaves stacked on a leading layers axis) steps,
    expands and reorders the cache as the unrolled model does."""
    model, params, image_tokens = setup
    scanned, stacked = model.clone(scan=True), convert.to_scanned(params)
    cache = jax.eval_shape(lambda: build.init_decode_cache(scanned, 2))
    index = cache["multimodal_decoder"]["decoder"]["blocks"]["self_attention"]["index"]
    assert index.shape == (model.multimodal_depth,)  # the layout the decoder must handle
    scanned_beam = jit_beam(scanned, 3)
    np.testing.assert_array_equal(
        scanned_beam(stacked, image_tokens, 0.6).tokens,
        beam3_fn(params, image_tokens, 0.6).tokens,
    )


# ------------------------------------------------------------------------------------ sampling
def test_sampling_is_seeded_and_reduces_to_greedy(setup, full_logits, greedy, sample_fn):
    model, params, image_tokens = setup

    def sample(seed, **kw):
        return sample_fn(params, image_tokens, seed, **kw)

    first, again, other = sample(0), sample(0), sample(1)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()
    assert (np.asarray(first.tokens) != np.asarray(greedy.tokens)).any()
    check_layout(first)
    recomputed = teacher_forced_log_prob(model, params, image_tokens, full_logits, first.tokens)
    np.testing.assert_allclose(first.log_prob, recomputed, rtol=1e-4, atol=1e-4)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
        np.testing.assert_array_equal(sample(3, **kw).tokens, greedy.tokens, err_msg=str(kw))


def test_sampling_follows_the_temperature(setup, full_logits, sample_fn):
    """How often the most likely first token is drawn matches softmax(logits / T)."""
    model, params, image_tokens = setup
    start = np.zeros((NUM_IMAGES, model.max_text_len + 1), np.int32)
    start[:, 0] = BOS_ID
    log_probs = _log_softmax(full_logits(params, image_tokens, start)[:, 0], 0)
    top = log_probs.argmax(-1)
    draws = 12
    expected = {}
    for temperature in (0.5, 2.0):
        p_top = np.asarray(jax.nn.softmax(log_probs / temperature, axis=-1))[
            np.arange(NUM_IMAGES), top
        ]
        hits = sum(
            int((np.asarray(out.tokens)[:, 1] == top).sum())
            for out in (
                sample_fn(params, image_tokens, s, temperature=temperature) for s in range(draws)
            )
        )
        mean, sd = draws * p_top.sum(), np.sqrt(draws * (p_top * (1 - p_top)).sum())
        assert abs(hits - mean) < 4 * sd, (temperature, hits, mean, sd)
        expected[temperature] = (mean, sd)
    # The two temperatures are far apart, so the check above can tell them apart.
    assert expected[0.5][0] - expected[2.0][0] > 10 * max(expected[0.5][1], expected[2.0][1])


def test_sampling_filters():
    log_probs = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))

    def kept(**kw):
        return np.isfinite(np.asarray(decoding_steps.sampling_logits(log_probs, **kw)))[0].tolist()

    assert kept() == [True] * 4
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=1e-9) == [True, False, False, False]  # the best token always stays
    assert kept(top_k=3, top_p=0.9) == [True, True, True, False]
    tempered = jax.nn.softmax(decoding_steps.sampling_logits(log_probs, temperature=2.0))
    np.testing.assert_allclose(tempered, jax.nn.softmax(log_probs / 2.0), rtol=1e-6)


# ------------------------------------------------------------------------------------ cache
@pytest.mark.parametrize("layers", [None, 2])
def test_cache_expand_and_reorder(layers):
    lead = () if layers is None else (layers,)
    rows = jnp.arange(2 * 3, dtype=jnp.float32)  # image b, beam k -> row 3b + k

    def leaf(value):
        return jnp.broadcast_to(value.reshape(lead[:0] + (-1, 1, 1, 1)), lead + (6, 5, 2, 4))

    cache = {
        "block": {
            "cached_key": leaf(rows),
            "cached_value": leaf(rows + 100),
            "context_key": leaf(rows),
            "index": jnp.zeros(lead, jnp.int32),
        },
        "position": jnp.zeros((), jnp.int32),
    }

    def rows_of(x):  # the value each batch row holds
        return np.asarray(x)[(0,) * len(lead) + (slice(None), 0, 0, 0)]

    source = jnp.array([[2, 2, 0], [1, 0, 0]])
    out = decoding_steps.reorder_cache(cache, source)
    np.testing.assert_array_equal(rows_of(out["block"]["cached_key"]), [2, 2, 0, 4, 3, 3])
    np.testing.assert_array_equal(rows_of(out["block"]["cached_value"]) - 100, [2, 2, 0, 4, 3, 3])
    np.testing.assert_array_equal(out["block"]["context_key"], cache["block"]["context_key"])
    batch_axis = len(lead)
    two_images = leaf(rows)[(slice(None),) * batch_axis + (slice(0, 2),)]
    expanded = decoding_steps.expand_cache({"cached_key": two_images}, 3)["cached_key"]
    assert expanded.shape[batch_axis] == 6
    np.testing.assert_array_equal(rows_of(expanded), [0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="unexpected decode cache entry"):
        decoding_steps.reorder_cache({"weird": leaf(rows)}, source)


def test_special_ids_come_from_the_model_config_or_the_caller(setup, greedy, beam3_fn):
    """A model whose bos/eos sit elsewhere (CLIP puts them last) decodes the same captions, ids
    relabelled, when its config states them: the same weights with the token rows and logit
    columns of (bos, eos) and (V-2, V-1) swapped. Passing the ids explicitly is the same."""
    model, params, image_tokens = setup
    v = model.vocab_size
    swap = np.arange(v)
    swap[[BOS_ID, EOS_ID, v - 2, v - 1]] = [v - 2, v - 1, BOS_ID, EOS_ID]
    text = params["text_encoder"]
    logits = params["multimodal_decoder"]["logits"]
    moved = {
        **params,
        "text_encoder": {
            **text,
            "token_embedding": {"embedding": text["token_embedding"]["embedding"][swap]},
        },
        "multimodal_decoder": {
            **params["multimodal_decoder"],
            "logits": {"kernel": logits["kernel"][:, swap], "bias": logits["bias"][swap]},
        },
    }
    clip_like = model.clone(bos_id=v - 2, eos_id=v - 1)
    stated = jit_generate(clip_like, method="greedy", max_len=MAX_LEN, min_len=MIN_LEN)
    np.testing.assert_array_equal(stated(moved, image_tokens).tokens, swap[greedy.tokens])
    special = SpecialIds(pad=PAD_ID, bos=v - 2, eos=v - 1)
    given = jit_generate(
        model, method="beam", num_beams=3, max_len=MAX_LEN, min_len=MIN_LEN, special_ids=special
    )(moved, image_tokens, length_penalty=jnp.float32(0.6), early_stopping=jnp.bool_(True))
    np.testing.assert_array_equal(given.tokens, swap[beam3_fn(params, image_tokens, 0.6).tokens])
    with pytest.raises(ValueError, match="hold the special ids"):
        decoding.generate(clip_like, params, image_tokens, num_tokens=v - 2)


def test_bad_settings_are_refused(setup):
    model, params, image_tokens = setup
    with pytest.raises(ValueError, match="max_text_len"):
        decoding.generate(model, params, image_tokens, max_len=model.max_text_len + 1)
    with pytest.raises(ValueError, match="method"):
        decoding.generate(model, params, image_tokens, method="nucleus")
    with pytest.raises(ValueError, match="rng"):
        decoding.generate(model, params, image_tokens, method="sample")
    with pytest.raises(ValueError, match="top_p"):
        decoding.generate(model, params, image_tokens, method="sample", top_p=0.0, rng=None)
    with pytest.raises(ValueError, match="captioning head"):
        decoding.generate(model.clone(use_captioning=False), params, image_tokens)
