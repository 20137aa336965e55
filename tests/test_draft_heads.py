"""Draft heads (speculative method "heads"): the head formula, untrained heads = the LM head, training
on the target's own greedy outputs, greedy output identical to plain greedy at batch 8 and 1, seeded
sampled runs, preemption, stale drafts, the checkpoint round trip and bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_runs import run_to_completion

from jinfer import config as config_lib
from jinfer import draft_heads
from jinfer.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.engine.request import Request
from jinfer.engine.speculation import Speculator
from jinfer.model import Model, init_params
from jinfer.sampling import SamplingParams
from jinfer.speculative import SpeculativeConfig

VOCAB = 64
HIDDEN = 32
NUM_HEADS = 3
PROMPT_LEN = 6
MAX_TOKENS = 12
CONFIG = EngineConfig(max_num_seqs=8, max_model_len=32, max_num_batched_tokens=64, page_size=8, kv_cache_memory="1MiB")


@functools.cache
def _tiny(tie_word_embeddings: bool = True) -> Model:
    """A random model whose next token depends mostly on the current one: weights at 10x the init scale
    (at 1x a random model repeats one token forever), attention outputs (o_proj) at 1x, so attention
    still changes the text but the text has structure that heads can learn."""
    config, _ = config_lib.read_preset("smollm2-135m")
    config = config.replace(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        layer_windows=(0, 0), eos_token_ids=(), tie_word_embeddings=tie_word_embeddings,
    )

    def scale(path, weights):
        name = jax.tree_util.keystr(path)
        return weights if "norm" in name else weights * (1.0 if "o_proj" in name else 10.0)

    params = jax.tree_util.tree_map_with_path(scale, init_params(config, seed=1))
    return Model(config, params, None, np.dtype(np.float32))


def _prompts(count: int, seed: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, VOCAB, (count, PROMPT_LEN)).tolist()


def _random_heads(num_heads: int, seed: int) -> draft_heads.DraftHeads:
    w1, w2 = jax.random.normal(jax.random.key(seed), (2, num_heads, HIDDEN, HIDDEN)) * HIDDEN**-0.5
    return draft_heads.DraftHeads({"w1": w1, "w2": w2}, VOCAB)


@pytest.fixture(scope="module")
def target():
    return _tiny()


@pytest.fixture(scope="module")
def examples(target):
    """(hidden, targets) of 40 greedy continuations: the first 30 to train on, the last 10 held out."""
    prompts = _prompts(40, seed=0)
    sequences = [p + target.greedy_continuation(p, 24) for p in prompts]
    hidden, targets = draft_heads.training_examples(target.params, target.config, target.dtype, sequences, [PROMPT_LEN] * 40, NUM_HEADS)
    split = 30 * 24
    return (hidden[:split], targets[:split]), (hidden[split:], targets[split:])


@pytest.fixture(scope="module")
def trained(target, examples):
    (hidden, targets), _ = examples
    untrained = draft_heads.init_heads(NUM_HEADS, HIDDEN, VOCAB)
    return draft_heads.train_heads(untrained, target.params, target.config, target.dtype, hidden, targets, steps=300, learning_rate=1e-2, batch_size=64)


@pytest.fixture(scope="module")
def heads_path(trained, tmp_path_factory):
    return str(draft_heads.save_heads(tmp_path_factory.mktemp("heads") / "heads.safetensors", trained))


def _engine(model, path, k, config=CONFIG):
    spec = SpeculativeConfig(method="heads", num_tokens=k, draft_heads=path, min_acceptance=0.0)
    return Engine(model, config, measure_step_memory=False, cache_fill=float("nan"), poison_freed_pages=True, speculative=spec)


@pytest.mark.parametrize("tie", [True, False])
def test_head_logits_follow_the_formula(tie):
    model = _tiny(tie_word_embeddings=tie)
    heads = _random_heads(NUM_HEADS, seed=3)
    hidden = np.random.default_rng(4).standard_normal((5, HIDDEN)).astype(np.float32)
    readout = np.asarray(model.params["embedding"] if tie else model.params["lm_head"]["kernel"])  # [V, D]
    w1, w2 = (np.asarray(heads.params[name]) for name in ("w1", "w2"))
    expected = []
    for i in range(NUM_HEADS):
        inner = hidden @ w1[i].T
        expected.append((hidden + (inner / (1 + np.exp(-inner))) @ w2[i].T) @ readout.T)
    got = draft_heads.head_logits(heads.params, model.params, jnp.asarray(hidden), model.config, model.dtype)
    np.testing.assert_allclose(np.asarray(got), np.stack(expected, axis=1), rtol=1e-4, atol=1e-3)


def test_untrained_heads_propose_the_lm_heads_argmax(target):
    heads = draft_heads.init_heads(NUM_HEADS, HIDDEN, VOCAB, seed=5)
    hidden = jnp.asarray(np.random.default_rng(6).standard_normal((7, HIDDEN)), jnp.float32)
    lm_argmax = np.argmax(np.asarray(hidden) @ np.asarray(target.params["embedding"]).T, axis=-1)
    drafts = np.asarray(draft_heads.propose(heads.params, target.params, hidden, NUM_HEADS, target.config, target.dtype))
    assert drafts.shape == (7, NUM_HEADS)
    assert (drafts == lm_argmax[:, None]).all()


def test_training_on_the_targets_outputs_raises_held_out_accuracy(target, examples, trained):
    _, (hidden, targets) = examples
    untrained = draft_heads.init_heads(NUM_HEADS, HIDDEN, VOCAB)
    before = draft_heads.head_accuracy(untrained, target.params, target.config, target.dtype, hidden, targets)
    after = draft_heads.head_accuracy(trained, target.params, target.config, target.dtype, hidden, targets)
    assert (after > before + 0.1).all(), (before, after)


# The pool is too small for every request's drafts: requests at batch 8 are preempted, recomputed and
# draft afresh. Prompts of k + 1 tokens put the prefill in a bucket the decode passes use too (every
# bucket shape is a compile of its own).
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculation_with_heads_equals_plain_greedy(target, heads_path, k):
    engine = _engine(target, heads_path, k, dataclasses.replace(CONFIG, kv_cache_memory="24KiB"))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    prompts = [p[: k + 1] for p in _prompts(9, seed=10 + k)]
    batch8 = run_to_completion(engine, prompts[:8], params)
    batch1 = run_to_completion(engine, prompts[8:], params)
    assert [r.output_ids for r in batch8 + batch1] == [target.greedy_continuation(p, MAX_TOKENS) for p in prompts]
    stats = engine.speculator.stats
    assert 0 < stats.accepted < stats.drafted
    assert sum(r.num_preemptions for r in batch8) > 0
    assert engine.allocator.num_free == engine.plan.num_pages - 1


def test_seeded_sampled_rows_with_heads_are_reproducible(target, heads_path):
    prompts = [p[:2] for p in _prompts(2, seed=21)]  # short prompts: the prefill shares a bucket with the decodes
    params = [SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=8, logprobs=2) for i in range(2)]

    def run():
        engine = _engine(target, heads_path, 1)
        return engine, run_to_completion(engine, prompts, params)

    engine, requests = run()
    for request in requests:
        assert len(request.output_ids) == 8 and all(0 <= t < VOCAB for t in request.output_ids)
        assert np.all(np.isfinite(request.logprobs)) and max(request.logprobs) <= 0
    assert engine.speculator.stats.drafted > 0
    assert [r.output_ids for r in run()[1]] == [r.output_ids for r in requests]


def test_stored_drafts_are_used_only_at_the_length_they_continue():
    speculator = Speculator(SpeculativeConfig(method="heads", num_tokens=3, draft_heads="unused"))
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=100), 0, 0)
    assert speculator(request, room=10) == (0, ())
    speculator.store_drafts(request, (7, 8, 9))
    assert speculator(request, room=10) == (3, (7, 8, 9))
    assert speculator(request, room=2) == (2, (7, 8))
    request.output_ids.append(7)
    assert speculator(request, room=10) == (0, ())
    speculator.store_drafts(request, (8, 9, 10))
    speculator.drop_drafts(request)
    assert speculator(request, room=10) == (0, ())


def test_checkpoint_round_trip(tmp_path):
    heads = _random_heads(4, seed=7)
    path = draft_heads.save_heads(tmp_path / "heads.safetensors", heads)
    loaded = draft_heads.load_heads(path)
    assert (loaded.num_heads, loaded.hidden_size, loaded.vocab_size) == (4, HIDDEN, VOCAB)
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(np.asarray(loaded.params[name]), np.asarray(heads.params[name]))


def test_bad_heads_setups_are_named(target, heads_path, tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="missing.safetensors"):
        _engine(target, missing, 1)
    with pytest.raises(ValueError, match=f"num_tokens=4 exceeds the {NUM_HEADS} draft heads"):
        _engine(target, heads_path, 4)
    narrow = draft_heads.save_heads(tmp_path / "narrow.safetensors", draft_heads.init_heads(2, HIDDEN // 2, VOCAB))
    with pytest.raises(ValueError, match=f"hidden size {HIDDEN // 2}; the target's is {HIDDEN}"):
        _engine(target, str(narrow), 1)
    wide = draft_heads.save_heads(tmp_path / "wide.safetensors", draft_heads.init_heads(2, HIDDEN, VOCAB + 1))
    with pytest.raises(ValueError, match=f"vocabulary size {VOCAB + 1}; the target's is {VOCAB}"):
        _engine(target, str(wide), 1)
    with pytest.raises(ValueError, match="draft_heads='h.safetensors'"):
        SpeculativeConfig(method="ngram", draft_heads="h.safetensors")
    with pytest.raises(ValueError, match="draft_heads=None"):
        SpeculativeConfig(method="heads")
