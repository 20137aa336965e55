"""The Python API and the CLI on the real SmolLM2-135M-Instruct."""

import subprocess
import sys

import numpy as np
import pytest

import jinfer
from jinfer import LLM, SamplingParams

pytestmark = pytest.mark.slow

ENGINE = dict(max_num_seqs=8, max_model_len=256, max_num_batched_tokens=64, kv_cache_memory="64MiB")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(smollm2_gguf, **ENGINE)


def _chat_ids(llm, messages):
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)


def test_batched_greedy_equals_full_sequence_greedy(llm):
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        expected = llm.model.greedy_continuation(llm.tokenizer.encode(prompt), 12)
        assert output.outputs[0].token_ids == expected
        assert output.outputs[0].text == llm.tokenizer.decode(expected)
        assert output.outputs[0].finish_reason == "length"


def test_chat_applies_the_template_and_stops_at_eos(llm):
    (output,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    completion = output.outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop" and completion.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert output.prompt_token_ids == _chat_ids(llm, QUESTION)


def test_stop_string_cuts_the_text(llm):
    (output,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=40, stop=["Paris"]), use_tqdm=False)
    completion = output.outputs[0]
    assert completion.finish_reason == "stop"
    assert "Paris" not in completion.text and completion.text.startswith("The capital of France")


def test_stop_token_ids_end_the_request(llm):
    (free,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    stop_at = free.outputs[0].token_ids[3]
    (stopped,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at]), use_tqdm=False)
    assert stopped.outputs[0].token_ids == free.outputs[0].token_ids[: free.outputs[0].token_ids.index(stop_at) + 1]


def test_stream_yields_the_same_text_as_generate(llm):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_tokens=24)
    prompt = _chat_ids(llm, [{"role": "user", "content": "Tell me about the sea."}])
    chunks = list(llm.stream(prompt, params))
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    assert "".join(c.text for c in chunks) == output.outputs[0].text
    assert [c.token_id for c in chunks] == output.outputs[0].token_ids
    assert chunks[-1].finish_reason == output.outputs[0].finish_reason and all(c.finish_reason is None for c in chunks[:-1])


def test_n_samples_are_distinct_and_seeded(llm):
    params = SamplingParams(temperature=1.0, n=3, seed=11, max_tokens=16)
    first = llm.chat([{"role": "user", "content": "Name an animal."}], params, use_tqdm=False)[0]
    again = llm.chat([{"role": "user", "content": "Name an animal."}], params, use_tqdm=False)[0]
    assert len(first.outputs) == 3
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]


def test_logprobs_equal_the_log_softmax_of_the_forward(llm):
    prompt = llm.tokenizer.encode("The capital of France is")
    (output,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, logprobs=3), use_tqdm=False)
    completion = output.outputs[0]
    logits = llm.model.logits(np.asarray([prompt]))[0, -1].astype(np.float64)
    log_softmax = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    assert completion.logprobs[0] == pytest.approx(log_softmax[completion.token_ids[0]], abs=1e-4)
    top = np.argsort(-log_softmax)[:3]
    assert list(completion.top_logprobs[0]) == top.tolist()
    assert list(completion.top_logprobs[0].values()) == pytest.approx(log_softmax[top].tolist(), abs=1e-4)


def test_bad_prompts_are_named(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="300 tokens"):
        llm.generate([[1] * 300], use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["hi"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_unknown_model_is_named():
    with pytest.raises(FileNotFoundError, match="no-such-model.gguf"):
        LLM("no-such-model.gguf")


def test_cli_generate_and_chat_print_the_greedy_answer(llm, tmp_path):
    """`generate` fills a compilation cache that `chat` then starts from (as a user's second run does)."""
    cache = f"--compilation_cache={tmp_path / 'xla'}"
    (expected,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    generate = subprocess.run(
        [sys.executable, "-m", "jinfer.cli", "generate", "--prompt=What is the capital of France?", "--max_tokens=12", cache],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert generate.stdout.strip() == expected.outputs[0].text.strip()
    assert "memory plan" in generate.stderr
    assert list((tmp_path / "programs").iterdir()), "generate saved no step programs"
    chat = subprocess.run(
        [sys.executable, "-m", "jinfer.cli", "chat", "--max_tokens=12", cache],
        input="What is the capital of France?\n\n",
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert expected.outputs[0].text.strip() in chat.stdout
