"""Tests for jinfer.eval.perplexity against transformers' loss on the same tokens.

The reference for strided windows is the loop of Hugging Face's perplexity guide: each window's
labels are masked (-100) up to the tokens earlier windows scored, and transformers' mean loss
times the number of scored labels is summed.
"""

import numpy as np
import pytest
import torch
from hf_reference import VOCAB, save_tiny_model

import jinfer
from jinfer.eval.perplexity import Window, perplexity, plan_windows
from pallas_kernels.testing import assert_close


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama as a jinfer model and as the transformers model it was saved from."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    reference = save_tiny_model("llama", directory)
    return jinfer.load(directory), reference


def random_tokens(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, count)


def hf_guide_nll(model, token_ids: np.ndarray, window: int, stride: int) -> tuple[float, int]:
    """Summed NLL and scored-token count by the perplexity guide's loop over transformers' loss."""
    num_tokens, nll, count, previous_end = len(token_ids), 0.0, 0, 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        inputs = torch.tensor(token_ids[begin:end])[None]
        labels = inputs.clone()
        labels[:, : -(end - previous_end)] = -100
        with torch.no_grad():
            loss = model(inputs, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll, count = nll + float(loss) * scored, count + scored
        previous_end = end
        if end == num_tokens:
            break
    return nll, count


def test_plan_windows_by_hand():
    assert plan_windows(10, window=4, stride=2) == [
        Window(start=0, end=4, first_target=1),
        Window(start=2, end=6, first_target=4),
        Window(start=4, end=8, first_target=6),
        Window(start=6, end=10, first_target=8),
    ]
    assert plan_windows(5, window=8, stride=4) == [Window(start=0, end=5, first_target=1)]


@pytest.mark.parametrize("num_tokens,window,stride", [(2, 2, 1), (37, 8, 3), (64, 16, 15), (100, 32, 16)])
def test_windows_score_every_token_but_the_first_once_with_context(num_tokens, window, stride):
    windows = plan_windows(num_tokens, window, stride)
    scored = [target for w in windows for target in range(w.first_target, w.end)]
    assert scored == list(range(1, num_tokens))
    assert all(w.start < w.first_target and w.end - w.start <= window for w in windows)
    assert all(b.start - a.start == stride for a, b in zip(windows, windows[1:]))


def test_one_window_is_transformers_loss(tiny):
    model, reference = tiny
    tokens = random_tokens(30)
    result = perplexity(model, tokens, window=64, stride=32)
    with torch.no_grad():
        loss = float(reference(torch.tensor(tokens)[None], labels=torch.tensor(tokens)[None]).loss)
    assert result.num_tokens == 29
    assert_close(result.mean_nll, loss)
    assert_close(np.log(result.perplexity), loss)


def test_strided_windows_match_the_guides_loop(tiny):
    """Five windows of 16 (the last one short) in batches of 2 (the last one padded)."""
    model, reference = tiny
    tokens = random_tokens(45, seed=1)
    result = perplexity(model, tokens, window=16, stride=8, batch_size=2)
    nll, count = hf_guide_nll(reference, tokens, window=16, stride=8)
    assert result.num_tokens == count == 44
    assert_close(result.nll / count, nll / count)


@pytest.mark.parametrize(
    "tokens,window,stride,match",
    [
        ([1], 8, 4, "at least 2 tokens"),
        ([1, 2, 3], 8, 8, "stride=8 must be in 1..window - 1 = 7"),
        ([1, 2, 3], 8, 0, "stride=0"),
        ([1, VOCAB, 3], 8, 4, f"token id {VOCAB} is out of the vocabulary"),
        ([[1, 2, 3]], 8, 4, "1-D integer array"),
        ([1, 2, 3], 512, 256, "window=512 exceeds the model's context of 256 tokens"),
    ],
)
def test_bad_arguments_are_named(tiny, tokens, window, stride, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny[0], np.array(tokens), window=window, stride=stride)
