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
def ours(smollm2_gguf):
    return jinfer.load(smollm2_gguf)


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
    ids = _chat_ids(ours, prompt)
    expected = list(ids)
    with torch.no_grad():
        for _ in range(CONTINUATION):
            expected.append(int(reference(torch.as_tensor([expected])).logits[0, -1].argmax()))
    assert ours.greedy_continuation(ids, CONTINUATION) == expected[len(ids) :]


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
