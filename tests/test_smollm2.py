"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers loading the same file, float32."""

import numpy as np
import pytest
import torch
import transformers

import jinfer
from pallas_kernels.testing import REAL_MODEL_FLOAT32_TOLERANCE, assert_close

pytestmark = pytest.mark.slow

PROMPTS = (
    "The capital of France is",
    "Write a haiku about the sea.",
    "def quicksort(items):",
)
CONTINUATION = 32


@pytest.fixture(scope="module")
def ours(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


def _chat_ids(model, prompt):
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return model.tokenizer.encode(text)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(ours, reference, prompt):
    tokens = np.asarray([_chat_ids(ours, prompt)])
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens)).logits.float().numpy()
    assert_close(ours.logits(tokens), expected, atol=REAL_MODEL_FLOAT32_TOLERANCE)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(ours, reference, prompt):
    """transformers' greedy continuation, teacher-forced through one forward of ours: each next token
    is our argmax at every position, which is our greedy continuation token for token."""
    ids = _chat_ids(ours, prompt)
    with torch.no_grad():
        generated = reference.generate(
            torch.as_tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=CONTINUATION, do_sample=False, eos_token_id=None,  # past EOS, as greedy_continuation
        )
    sequence = generated[0].tolist()
    assert len(sequence) == len(ids) + CONTINUATION
    our_next = np.argmax(ours.logits(np.asarray([sequence]))[0, len(ids) - 1 : -1], axis=-1)
    assert our_next.tolist() == sequence[len(ids) :]


def test_converted_checkpoint_gives_identical_logits(ours, smollm2_gguf, tmp_path):
    from jinfer.checkpoint.convert import convert

    convert(smollm2_gguf, tmp_path / "smollm2")
    converted = jinfer.load(tmp_path / "smollm2")
    tokens = np.asarray([_chat_ids(ours, PROMPTS[0])])
    np.testing.assert_array_equal(converted.logits(tokens), ours.logits(tokens))
    assert converted.tokenizer.encode(PROMPTS[1]) == ours.tokenizer.encode(PROMPTS[1])
    assert converted.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == ours.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}]
    )
