"""Speculative decoding in the engine: greedy output identical to plain greedy (full-sequence forward)
for every draft source, batch 1 and 8, k = 1..6; sampled speculation; stops inside an accepted run;
page accounting; bad configurations."""

import dataclasses

import numpy as np
import pytest
from engine_runs import run_to_completion

from jinfer import config as config_lib
from jinfer.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.model import Model, init_params
from jinfer.sampling import SamplingParams
from jinfer.engine.request import Request
from jinfer.engine.speculation import RETRY_AFTER, Speculator
from jinfer.speculative import SpeculativeConfig
from jinfer.speculative_step import speculative_step

VOCAB = 64
NAN = float("nan")
MAX_TOKENS = 12

CONFIG = EngineConfig(max_num_seqs=8, max_model_len=32, max_num_batched_tokens=64, page_size=8, kv_cache_memory="1MiB")


def _tiny(num_layers: int, seed: int) -> Model:
    config, _ = config_lib.read_preset("smollm2-135m")
    config = config.replace(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8,
        layer_windows=(0,) * num_layers, eos_token_ids=(),
    )
    return Model(config, init_params(config, seed=seed), None, np.dtype(np.float32))


@pytest.fixture(scope="module")
def target():
    return _tiny(num_layers=2, seed=1)


def _prompts(count, seed):
    """Repetitive prompts (a random phrase three times), so that n-gram lookup finds matches."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, int(n)).tolist() * 3)[: int(n) * 3 - i % 3] for i, n in enumerate(rng.integers(3, 6, count))]


def _engine(model, spec, draft=None, config=CONFIG):
    return Engine(model, config, measure_step_memory=False, cache_fill=NAN, poison_freed_pages=True, speculative=spec, draft_model=draft)


@pytest.fixture(scope="module")
def other():
    """A different random model with the target's vocabulary: its drafts are mostly rejected."""
    return _tiny(num_layers=1, seed=2)


def _method(name, target, other):
    """(SpeculativeConfig options, draft model) of a draft source. The self drafter runs all layers
    (every draft kept: the drafts and the target's pool are right) or one (drafts mostly rejected);
    the draft model is the target itself (every draft kept) or another random model."""
    return {
        "ngram": ({}, None),
        "self-full": ({"method": "self", "self_layers": 2}, None),
        "self-1": ({"method": "self", "self_layers": 1}, None),
        "draft-same": ({"method": "draft", "draft_model": "target"}, target),
        "draft-other": ({"method": "draft", "draft_model": "other"}, other),
    }[name]


# k = 1..6 and every draft source, each case a compile of its own: n-gram lookup at three k, the rest once.
CASES = [("ngram", 1), ("self-1", 2), ("draft-other", 3), ("ngram", 4), ("draft-same", 4), ("self-full", 5), ("ngram", 6)]


@pytest.mark.parametrize("method, k", CASES)
def test_greedy_speculation_equals_plain_greedy(target, other, method, k):
    options, draft = _method(method, target, other)
    engine = _engine(target, SpeculativeConfig(num_tokens=k, min_acceptance=0.0, **options), draft)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    prompts = _prompts(9, seed=k)
    batch8 = run_to_completion(engine, prompts[:8], params)
    batch1 = run_to_completion(engine, prompts[8:], params)
    expected = [target.greedy_continuation(p, MAX_TOKENS) for p in prompts]
    assert [r.output_ids for r in batch8 + batch1] == expected
    stats = engine.speculator.stats
    assert stats.drafted > 0
    if method in ("self-full", "draft-same"):
        assert stats.accepted == stats.drafted
    if method != "self-1":
        assert stats.accepted > 0
    assert engine.allocator.num_free == engine.plan.num_pages - 1


def test_stop_token_and_max_tokens_inside_an_acceptedrun_to_completion(target):
    """The draft model is the target, so every pass keeps all 4 drafts: stops land inside runs."""
    engine = _engine(target, SpeculativeConfig(method="draft", num_tokens=4, draft_model="target", min_acceptance=0.0), target)
    prompt = _prompts(1, seed=20)[0]
    expected = target.greedy_continuation(prompt, MAX_TOKENS)
    stop = expected[6]
    cut = expected.index(stop) + 1
    stopped, = run_to_completion(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=(stop,)))
    assert stopped.output_ids == expected[:cut] and stopped.finish_reason == "stop"
    short, = run_to_completion(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=3))
    assert short.output_ids == expected[:3] and short.finish_reason == "length"
    assert engine.speculator.stats.accepted > 0
    assert engine.allocator.num_free == engine.plan.num_pages - 1


def test_seeded_sampled_speculation_gives_valid_reproducible_tokens(target, other):
    spec = SpeculativeConfig(method="draft", num_tokens=3, draft_model="other", min_acceptance=0.0)
    prompts = _prompts(3, seed=21)
    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=i, max_tokens=MAX_TOKENS, logprobs=2) for i in range(3)]

    def run():
        engine = _engine(target, spec, other)
        return engine, run_to_completion(engine, prompts, params)

    engine, requests = run()
    for request in requests:
        assert len(request.output_ids) == MAX_TOKENS and all(0 <= t < VOCAB for t in request.output_ids)
        assert np.all(np.isfinite(request.logprobs)) and max(request.logprobs) <= 0
        assert all(len(top) == 2 for top in request.top_logprobs)
    assert engine.speculator.stats.accepted > 0
    assert [r.output_ids for r in run()[1]] == [r.output_ids for r in requests]


def test_preemption_and_exact_page_accounting(target):
    """A pool too small for every request's drafts: requests are preempted and recomputed; after every
    step the pages held are exactly the allocator's used pages, and all return at the end."""
    config = dataclasses.replace(CONFIG, kv_cache_memory="40KiB")
    engine = _engine(target, SpeculativeConfig(num_tokens=4, min_acceptance=0.0), config=config)
    prompts = _prompts(8, seed=22)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    requests = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
        running = engine.scheduler.running
        assert sum(len(r.pages) for r in running) == engine.allocator.num_used
        assert all(len(r.pages) >= engine.scheduler.pages_needed(r.num_computed) for r in running)
    assert sum(r.num_preemptions for r in requests) > 0
    assert engine.speculator.stats.accepted > 0
    assert [r.output_ids for r in requests] == [target.greedy_continuation(p, MAX_TOKENS) for p in prompts]
    assert engine.allocator.num_free == engine.plan.num_pages - 1


def test_exported_step_programs_run_the_speculative_step(target, tmp_path):
    config = dataclasses.replace(CONFIG, program_cache=str(tmp_path))
    engine = _engine(target, SpeculativeConfig(num_tokens=4, min_acceptance=0.0), config=config)
    prompt = _prompts(1, seed=24)[0]
    request, = run_to_completion(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert request.output_ids == target.greedy_continuation(prompt, MAX_TOKENS)
    assert engine.speculator.stats.accepted > 0
    assert len(list(tmp_path.glob("*.jaxexport"))) == len(engine.bucket_shapes_used) + len(engine.speculative_shapes_used)


def test_low_acceptance_falls_back_to_plain_decoding_then_probes():
    speculator = Speculator(SpeculativeConfig(method="self", num_tokens=4, min_acceptance=0.5))
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=100), 0, 0)
    assert speculator(request, room=10) == (4, ())
    assert speculator(request, room=2) == (2, ())
    speculator.record(request, 4, 0)  # average 1/2: still speculating
    assert speculator(request, room=10) == (4, ())
    speculator.record(request, 4, 1)  # 1/4 + 1/8 < 1/2: plain decoding
    decisions = [speculator(request, room=10)[0] for _ in range(2 * RETRY_AFTER)]
    assert decisions.count(4) == 2 and decisions[RETRY_AFTER - 1] == 4
    speculator.record(request, 4, 4)  # a good probe: 3/16 + 1/2 >= 1/2
    assert speculator(request, room=10) == (4, ())
    penalised = Request("p", [1, 2, 3], SamplingParams(max_tokens=100, repetition_penalty=1.2), 0, 1)
    assert speculator(penalised, room=10) == (0, ())


def test_plain_engine_compiles_no_speculative_program(target):
    compiled = speculative_step._cache_size()
    engine = Engine(target, CONFIG, measure_step_memory=False)
    run_to_completion(engine, _prompts(2, seed=23), SamplingParams(temperature=0.0, max_tokens=4))
    assert speculative_step._cache_size() == compiled and not engine.speculative_shapes_used


@pytest.mark.parametrize(
    "options, message",
    [({"num_tokens": -1}, "num_tokens=-1"), ({"num_tokens": 17}, "num_tokens=17"), ({"self_layers": 0, "method": "self"}, "self_layers=0")],
)
def test_bad_speculative_configs_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**options)


def test_bad_draft_setups_are_named(target):
    wrong_vocab = Model(target.config.replace(vocab_size=VOCAB + 1), None, None, target.dtype)
    with pytest.raises(ValueError, match=f"{VOCAB + 1}.*{VOCAB}"):
        _engine(target, SpeculativeConfig(method="draft", draft_model="wrong"), wrong_vocab)
    with pytest.raises(ValueError, match="self_layers=3"):
        _engine(target, SpeculativeConfig(method="self", self_layers=3))
    with pytest.raises(ValueError, match="'draft' needs a draft_model"):
        _engine(target, SpeculativeConfig(method="draft", draft_model="missing"))


# ------------------------------------------------------------------------------------------ SmolLM2

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished "
    "the great lens and wound the clockwork that turned the light. Ships far out at sea saw the beam sweep "
    "across the water and knew where the rocks were."
)


def _smollm2_speculativerun_to_completion(smollm2, speculative: SpeculativeConfig, draft: Model | None = None):
    """The real model at batch 8, then one of its prompts alone, speculating on passages it is asked
    to repeat -> the engine. Plain greedy decoding is checked teacher-forced: one full-sequence
    forward over each prompt and its speculative output gives, at every generated position, that
    token as its argmax (a plain greedy run would compile the 30-layer step again for every bucket)."""
    tokenizer = smollm2.tokenizer
    asks = ["Repeat this passage word for word:", "Summarise this passage:", "Copy the text below exactly:", "Rewrite this passage:"]
    chats = [[{"role": "user", "content": f"{ask}\n\n{PASSAGE}"}] for ask in asks * 2]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False) for chat in chats]
    config = EngineConfig(max_num_seqs=8, max_model_len=128, max_num_batched_tokens=64, page_size=16, kv_cache_memory="16MiB")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine = Engine(smollm2, config, measure_step_memory=False, speculative=speculative, draft_model=draft)
    outputs = [r.output_ids for r in run_to_completion(engine, prompts, params)]
    assert engine.speculator.stats.drafted > 0
    sequences = [prompt + output for prompt, output in zip(prompts, outputs)]
    width = max(map(len, sequences))
    logits = smollm2.logits(np.asarray([sequence + [0] * (width - len(sequence)) for sequence in sequences]))
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        assert np.argmax(logits[row, len(prompt) - 1 : len(prompt) - 1 + len(output)], axis=-1).tolist() == output
    drafted_at_batch_8 = engine.speculator.stats.drafted
    (alone,) = run_to_completion(engine, prompts[:1], params)
    assert alone.output_ids == outputs[0]
    assert engine.speculator.stats.drafted > drafted_at_batch_8
    return engine


@pytest.mark.slow
def test_smollm2_greedy_ngram_speculation_equals_plain(smollm2):
    engine = _smollm2_speculativerun_to_completion(smollm2, SpeculativeConfig(method="ngram", num_tokens=4, min_acceptance=0.0))
    assert engine.speculator.stats.accepted > 0


@pytest.mark.slow
def test_smollm2_greedy_self_drafting_equals_plain(smollm2):
    """Layer-skip on SmolLM2 (an untrained early exit) keeps few drafts: the rejections are what this
    checks on the real model; the tiny models cover accepted runs."""
    _smollm2_speculativerun_to_completion(smollm2, SpeculativeConfig(method="self", num_tokens=2, min_acceptance=0.0))


@pytest.mark.slow
def test_smollm2_greedy_draft_model_speculation_equals_plain(smollm2):
    """A one-layer random draft model with SmolLM2's vocabulary, whose drafts are mostly rejected (no
    smaller trained model shares SmolLM2's tokenizer offline; the tiny models cover accepted runs)."""
    config = smollm2.config.replace(
        hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, layer_windows=(0,)
    )
    draft = Model(config, init_params(config, seed=3), None, np.dtype(np.float32))
    speculative = SpeculativeConfig(method="draft", num_tokens=3, draft_model="random one-layer", min_acceptance=0.0)
    _smollm2_speculativerun_to_completion(smollm2, speculative, draft)
