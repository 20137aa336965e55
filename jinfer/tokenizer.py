"""Text <-> token ids for every checkpoint format jinfer reads.

Whatever the source (``tokenizer.json``, a sentencepiece ``tokenizer.model`` or the vocabulary a
GGUF file embeds), it is turned into one ``tokenizers.Tokenizer`` and wrapped in ``Tokenizer``,
which adds what an inference engine needs on top: BOS handling, the end-of-generation ids, chat
template rendering and streaming detokenization.
"""

from __future__ import annotations

import datetime
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

# Piece types, numbered alike by sentencepiece's ModelProto and GGUF's tokenizer.ggml.token_type.
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6
# sentencepiece's TrainerSpec.model_type for a unigram model.
_SENTENCEPIECE_UNIGRAM = 1

# tokenizer.ggml.pre -> the regexes that split text, in turn, before byte-level BPE: llama.cpp's,
# except that "default" (the converter's fallback) reads as GPT-2's split, as transformers reads it.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_GGUF_PRE_TOKENIZER_REGEXES = {
    "default": [_GPT2_REGEX],
    "gpt-2": [_GPT2_REGEX],
    "smollm": [r"\p{N}", _GPT2_REGEX],
    "llama-bpe": [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    "qwen2": [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
}
# Pre-tokenizer types whose words already in the vocabulary are taken whole, without merging.
_GGUF_IGNORE_MERGES = frozenset({"llama-bpe"})


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus BOS/EOS policy and the model's chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool,
        chat_template: str | None,
        pad_token_id: int | None = None,
    ):
        """``eos_token_ids[0]`` is the model's own EOS token; the rest also end generation."""
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        self.pad_token_id = pad_token_id

    @classmethod
    def from_pretrained_dir(cls, path: str | pathlib.Path) -> Tokenizer:
        """A Hugging Face tokenizer directory: tokenizer.json or tokenizer.model plus its configs."""
        path = pathlib.Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"No tokenizer directory at {path}")
        config = _read_json(path / "special_tokens_map.json") | _read_json(path / "tokenizer_config.json")
        generation_config = _read_json(path / "generation_config.json")

        has_tokenizer_json = (path / "tokenizer.json").is_file()
        if has_tokenizer_json:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "tokenizer.model").is_file():
            backend = _backend_from_sentencepiece_file(path / "tokenizer.model")
            _add_configured_tokens(backend, config.get("added_tokens_decoder", {}))
        else:
            raise ValueError(f"{path} holds neither tokenizer.json nor tokenizer.model")

        def configured_id(name: str, default: int | None = None) -> int | None:
            """The id of the special token the tokenizer configs spell out under ``name``."""
            token = config.get(name)
            if isinstance(token, dict):
                token = token["content"]
            return backend.token_to_id(token) if token is not None else default

        bos_token_id = configured_id("bos_token", default=generation_config.get("bos_token_id"))
        pad_token_id = configured_id("pad_token", default=generation_config.get("pad_token_id"))
        generation_eos = generation_config.get("eos_token_id")
        eos_token_ids = [configured_id("eos_token")]
        eos_token_ids += generation_eos if isinstance(generation_eos, list) else [generation_eos]
        if has_tokenizer_json:  # as in transformers, its post-processor decides, not add_bos_token
            add_bos = bos_token_id is not None and backend.encode("a").ids[:1] == [bos_token_id]
        else:
            add_bos = bool(config.get("add_bos_token", False))
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=_unique_ids(eos_token_ids),
            add_bos=add_bos,
            chat_template=_chat_template_from_dir(path, config),
            pad_token_id=pad_token_id,
        )

    @classmethod
    def from_gguf(cls, path: str | pathlib.Path) -> Tokenizer:
        """The vocabulary embedded in a GGUF file's ``tokenizer.*`` metadata."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No GGUF file at {path}")
        reader = gguf.GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
        return cls.from_gguf_metadata(metadata, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], source: str) -> Tokenizer:
        """The vocabulary in already-read GGUF metadata (``tokenizer.*`` keys); ``source`` names the file in errors."""
        kind = metadata.get("tokenizer.ggml.model")
        missing = [key for key in _GGUF_TOKENIZER_KEYS.get(kind, ()) if key not in metadata]
        if missing:
            raise ValueError(f"{source}: a {kind!r} tokenizer needs the GGUF keys {missing}, which the file lacks")
        if kind == "gpt2":
            backend = _byte_level_backend_from_gguf(metadata)
        elif kind == "llama":
            backend = _sentencepiece_backend(
                metadata["tokenizer.ggml.tokens"],
                metadata["tokenizer.ggml.scores"],
                metadata["tokenizer.ggml.token_type"],
                unigram=False,
                add_dummy_prefix=metadata.get("tokenizer.ggml.add_space_prefix", True),
            )
        else:
            raise ValueError(f"{source}: unsupported tokenizer.ggml.model {kind!r}; expected 'gpt2' or 'llama'")

        eos_token_ids = [metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
        return cls(
            backend,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_unique_ids(eos_token_ids),
            add_bos=metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"),
            chat_template=metadata.get("tokenizer.chat_template"),
            pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        )

    def save(self, directory: str | pathlib.Path) -> None:
        """Writes tokenizer.json, tokenizer_config.json and generation_config.json that
        ``from_pretrained_dir`` (and transformers) read back to the same tokenizer."""
        directory = pathlib.Path(directory)
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        if self.add_bos:
            bos = self.bos_token
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_token_id)]
            )
        backend.save(str(directory / "tokenizer.json"))
        pad = self.backend.id_to_token(self.pad_token_id) if self.pad_token_id is not None else None
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": pad, "chat_template": self.chat_template}
        (directory / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.eos_token_ids)}, indent=2))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in it are matched, and BOS is prepended if due."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_special_tokens and self.add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(token_id) for token_id in ids]
        vocab_size = self.vocab_size
        for token_id in ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"Token id {token_id} is out of range for vocabulary size {vocab_size}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, rendered as Hugging Face's ``apply_chat_template`` does."""
        if self.chat_template is None:
            raise ValueError("This tokenizer has no chat template")
        return self._compiled_chat_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def _byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the ``<0xNN>`` pieces a sentencepiece-style vocabulary spells unknown characters with."""
        ids = (self.backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
        return frozenset(token_id for token_id in ids if token_id is not None)

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` leaves out."""
        return frozenset(index for index, token in self.backend.get_added_tokens_decoder().items() if token.special)

    @functools.cached_property
    def _compiled_chat_template(self) -> jinja2.Template:
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_template_error
        environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
        return environment.from_string(self.chat_template)


class IncrementalDetokenizer:
    """Streams the text of a growing id sequence, one token at a time.

    Each step decodes a short window of recent ids and returns the characters past the ones already
    returned. Text is held back while it ends in U+FFFD (a UTF-8 character still missing bytes) or in
    a byte-fallback piece, since the next byte piece can turn the whole run of bytes invalid. After
    each return the window restarts at the newest token if that token alone decodes to some text, so
    decoders that look at a window's start (sentencepiece dropping the first space) only ever change
    text that was already returned.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._skipped_ids = tokenizer._special_ids if skip_special_tokens else frozenset()
        self._window: list[int] = []
        self._returned_chars = 0
        self._ends_in_byte_piece = False

    def add(self, token_id: int) -> str:
        """The text that ``token_id`` makes final; often empty."""
        self._window.append(token_id)
        if token_id not in self._skipped_ids:
            self._ends_in_byte_piece = token_id in self._tokenizer._byte_fallback_ids
        text = self._decode(self._window)
        if text.endswith("\ufffd") or self._ends_in_byte_piece:
            return ""
        new_text = text[self._returned_chars :]
        last_text = self._decode(self._window[-1:])
        if last_text:
            self._window, self._returned_chars = self._window[-1:], len(last_text)
        else:
            self._returned_chars = len(text)
        return new_text

    def flush(self) -> str:
        """Whatever is still held back, incomplete characters included."""
        text = self._decode(self._window)
        new_text = text[self._returned_chars :]
        self._returned_chars = len(text)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _unique_ids(ids: list[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(token_id for token_id in ids if token_id is not None))


def _chat_template_from_dir(path: pathlib.Path, config: dict[str, Any]) -> str | None:
    """The template from chat_template.jinja, chat_template.json or tokenizer_config.json, in that order."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _add_configured_tokens(backend: tokenizers.Tokenizer, added_tokens_decoder: dict[str, dict[str, Any]]) -> None:
    """Adds the tokens tokenizer_config.json's ``added_tokens_decoder`` lists, in id order."""
    for _, spec in sorted(added_tokens_decoder.items(), key=lambda item: int(item[0])):
        options = {key: spec[key] for key in ("single_word", "lstrip", "rstrip", "normalized") if key in spec}
        token = AddedToken(spec["content"], special=spec.get("special", False), **options)
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


_GGUF_TOKENIZER_KEYS = {
    "gpt2": ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"),
    "llama": ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"),
}


def _byte_level_backend_from_gguf(metadata: dict[str, Any]) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE; the pre-tokenizer is chosen by ``tokenizer.ggml.pre``."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE_TOKENIZER_REGEXES:
        supported = ", ".join(sorted(_GGUF_PRE_TOKENIZER_REGEXES))
        raise ValueError(f"Unknown tokenizer.ggml.pre {pre!r}; supported: {supported}")
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _GGUF_IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in _GGUF_PRE_TOKENIZER_REGEXES[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, tokens, metadata.get("tokenizer.ggml.token_type", []))
    return backend


def _backend_from_sentencepiece_file(path: pathlib.Path) -> tokenizers.Tokenizer:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    spec = proto.normalizer_spec
    text_normalizers = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        text_normalizers += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    return _sentencepiece_backend(
        [piece.piece for piece in proto.pieces],
        [piece.score for piece in proto.pieces],
        [piece.type for piece in proto.pieces],
        unigram=proto.trainer_spec.model_type == _SENTENCEPIECE_UNIGRAM,
        add_dummy_prefix=spec.add_dummy_prefix,
        text_normalizers=text_normalizers,
    )


def _sentencepiece_backend(
    pieces: list[str],
    scores: list[float],
    types: list[int],
    *,
    unigram: bool,
    add_dummy_prefix: bool,
    text_normalizers: Sequence[normalizers.Normalizer] = (),
) -> tokenizers.Tokenizer:
    """A sentencepiece vocabulary (``▁`` for spaces, ``<0xNN>`` byte pieces) as a tokenizers model.

    Each run of text between special tokens is encoded as sentencepiece encodes a whole text, dummy
    prefix included (llama.cpp does the same). A BPE vocabulary stores no merges: a pair merges in
    the order of the score of the piece it makes.
    """
    byte_fallback = _BYTE in types
    unknown_id = types.index(_UNKNOWN) if _UNKNOWN in types else None
    if unigram:
        model = models.Unigram(list(zip(pieces, scores)), unknown_id, byte_fallback)
    else:
        vocab = {piece: index for index, piece in enumerate(pieces)}
        merges = _merges_by_score(pieces, scores, types, vocab)
        unknown = pieces[unknown_id] if unknown_id is not None else None
        model = models.BPE(vocab, merges, unk_token=unknown, fuse_unk=True, byte_fallback=byte_fallback)
    backend = tokenizers.Tokenizer(model)
    dummy_prefix = [normalizers.Prepend("▁")] if add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*text_normalizers, *dummy_prefix, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_dummy_prefix else steps)
    _add_typed_tokens(backend, pieces, types)
    return backend


def _merges_by_score(
    pieces: list[str], scores: list[float], types: list[int], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces, best-scoring result first."""
    ranked = [
        (-score, index, piece[:split], piece[split:])
        for index, (piece, score, kind) in enumerate(zip(pieces, scores, types))
        if kind not in (_UNKNOWN, _CONTROL, _BYTE)
        for split in range(1, len(piece))
        if piece[:split] in vocab and piece[split:] in vocab
    ]
    return [(left, right) for *_, left, right in sorted(ranked)]


def _add_typed_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Matches control and unknown tokens whole as special tokens, user-defined ones as plain added tokens."""
    special = [token for token, kind in zip(tokens, types) if kind in (_UNKNOWN, _CONTROL)]
    user_defined = [token for token, kind in zip(tokens, types) if kind == _USER_DEFINED]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in user_defined])
