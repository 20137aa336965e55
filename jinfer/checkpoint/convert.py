"""HF safetensors directory or GGUF file -> jinfer Orbax checkpoint, with a parity report."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import numpy as np
from absl import logging
from jax.sharding import Mesh

from jinfer.checkpoint import orbax_io
from jinfer.model import Model, load
from jinfer.quantize import quantization_record

PARITY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, the first humans",
)


@dataclasses.dataclass(frozen=True)
class ParityRow:
    prompt: str
    max_abs_logit_diff: float
    next_token_source: int
    next_token_converted: int

    @property
    def agrees(self) -> bool:
        return self.next_token_source == self.next_token_converted


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_lm_head: bool = True,
) -> Model:
    """Loads `source` tensor by tensor, writes `<output>/params` + config.json + tokenizer files.

    With `mesh` the parameters are loaded into that mesh and saved as they lie, each array chunked
    by its shards, so restoring into the same mesh reads every device's shard as one chunk.
    With `quantize` ("int8", "int4", "w4a8" or "w4a16" with `group_size`, "w8a8", or "gguf": a GGUF file's blocks as
    stored; the LM head too unless `quantize_lm_head` is False) the quantized layouts are saved, and config.json records them (`quantize.quantization_record`),
    so `jinfer.load(output)` restores them without quantizing again.
    """
    model = load(source, dtype=dtype, mesh=mesh, quantize=quantize, group_size=group_size, quantize_lm_head=quantize_lm_head)
    record = None if quantize is None else quantization_record(model.params, quantize, group_size)
    output = orbax_io.save(output, model.params, model.config, record)
    if model.tokenizer is not None:
        model.tokenizer.save(output)
    logging.info("wrote %s", output)
    return model


def _transformers_logits(source: pathlib.Path):
    """A callable tokens [1, S] -> float32 logits [1, S, V] running the source through transformers."""
    import torch
    import transformers

    if source.is_file():
        reference = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    else:
        reference = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    reference.eval()

    def logits(tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return reference(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()

    return logits


def parity_report(source: str | os.PathLike, converted: Model, prompts=PARITY_PROMPTS) -> tuple[str, list[ParityRow]]:
    """Compares the converted checkpoint with the source: through transformers when it is
    installed (an independent implementation), else through jinfer's own loader of the source."""
    source = pathlib.Path(source)
    if importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
        reference_name, reference = "transformers", _transformers_logits(source)
    else:
        logging.warning("transformers is not installed: the parity report compares against jinfer's loader of the source")
        reference_name, reference = "jinfer (source)", load(source, dtype=converted.dtype).logits
    tokenizer = converted.tokenizer
    rows = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if tokenizer else [b % converted.config.vocab_size for b in prompt.encode()]
        tokens = np.asarray([ids])
        expected, actual = reference(tokens)[0, -1], converted.logits(tokens)[0, -1]
        rows.append(ParityRow(prompt, float(np.max(np.abs(expected - actual))), int(np.argmax(expected)), int(np.argmax(actual))))
    return reference_name, rows


def format_report(reference_name: str, rows: list[ParityRow]) -> str:
    width = max(len(r.prompt) for r in rows)
    lines = [f"parity against {reference_name}:", f"{'prompt':<{width}}  {'max |Δlogit|':>12}  next token agrees"]
    lines += [f"{r.prompt:<{width}}  {r.max_abs_logit_diff:>12.3g}  {'yes' if r.agrees else 'NO'} ({r.next_token_source} / {r.next_token_converted})" for r in rows]
    return "\n".join(lines)
