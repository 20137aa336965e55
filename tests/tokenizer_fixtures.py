"""Small tokenizer files built from scratch for the tokenizer tests: no download needed."""

from __future__ import annotations

import json
import pathlib
import random

import gguf
import numpy as np
import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

_WORDS = (
    "the quick brown fox jumps over lazy dog model token text stream decode encode inference "
    "attention layer weight cache batch prompt answer question hello world python function return "
    "café naïve façade straße über Øresund jalapeño résumé 東京 北京 日本語 中文 한국어 привет мир"
).split()
_CODE = ("def f(x):", "    return x + 1", "\tif a == b:", "for i in range(10):", "print('done')  # ok")

# Exercises what Hugging Face's template environment adds to jinja2: trim_blocks and lstrip_blocks,
# loop controls, raise_exception, strftime_now and a tojson that keeps non-ASCII characters.
CHAT_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if loop.index0 == 100 %}{% break %}{% endif %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
{{ {'turns': messages | length, 'note': 'é', 'year_digits': strftime_now('%Y') | length} | tojson }}"""


def corpus(lines: int = 400) -> list[str]:
    """Deterministic lines of words in several scripts, numbers, code and whitespace runs."""
    rng = random.Random(0)
    text = []
    for index in range(lines):
        words = rng.choices(_WORDS, k=rng.randint(3, 12))
        if index % 5 == 0:
            words.append(str(rng.randint(0, 10**6)))
        separator = "  " if index % 7 == 0 else " "
        text.append(rng.choice(_CODE) if index % 9 == 0 else separator.join(words))
    return text


def write_byte_level_bpe_dir(directory: pathlib.Path, *, bos_in_post_processor: bool, tokenizer_config: dict) -> None:
    """Trains a GPT-2 style byte-level BPE and saves it as an HF tokenizer directory."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>", "<|end_turn|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    if bos_in_post_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", 0)]
        )
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def train_sentencepiece(directory: pathlib.Path, **options) -> pathlib.Path:
    """Trains a small sentencepiece model on ``corpus()``; returns the .model path."""
    directory.mkdir(parents=True, exist_ok=True)
    text_file = directory / "corpus.txt"
    text_file.write_text("\n".join(corpus()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(directory / "tokenizer"),
        character_coverage=1.0,
        minloglevel=2,
        **options,
    )
    return directory / "tokenizer.model"


def llama_style_sentencepiece_options() -> dict:
    """Llama's trainer settings: BPE, byte fallback, no normalization, spaces kept as they are."""
    return dict(
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["<|user|>"],
    )


def write_gguf(path: pathlib.Path, tokenizer_metadata: dict) -> None:
    """A GGUF with a tiny llama model's metadata, one tensor, and the given ``tokenizer.*`` keys."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokenizer_metadata["tokenizer.ggml.tokens"]))
    for key, value in tokenizer_metadata.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sentencepiece_gguf_metadata(model_file: pathlib.Path) -> dict:
    """The ``tokenizer.*`` keys llama.cpp's converter writes for a sentencepiece model."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [piece.piece for piece in proto.pieces],
        "tokenizer.ggml.scores": [piece.score for piece in proto.pieces],
        "tokenizer.ggml.token_type": [piece.type for piece in proto.pieces],
        "tokenizer.ggml.bos_token_id": proto.trainer_spec.bos_id,
        "tokenizer.ggml.eos_token_id": proto.trainer_spec.eos_id,
        "tokenizer.ggml.unknown_token_id": proto.trainer_spec.unk_id,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def byte_level_gguf_metadata(tokenizer_json: pathlib.Path, pre: str) -> dict:
    """The ``tokenizer.*`` keys llama.cpp's converter writes for a byte-level BPE tokenizer.json."""
    spec = json.loads(tokenizer_json.read_text())
    vocab = spec["model"]["vocab"]
    special = {token["content"] for token in spec["added_tokens"] if token["special"]}
    tokens = sorted(vocab, key=vocab.get)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if token in special else 1 for token in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab["<|bos|>"],
        "tokenizer.ggml.eos_token_id": vocab["<|eos|>"],
        "tokenizer.ggml.padding_token_id": vocab["<|pad|>"],
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
