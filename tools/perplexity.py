"""Perplexity of a model over a real English text, one row per mode.

    python tools/perplexity.py [--model=PATH] [--modes=f32,bf16] [--text=pydoc:types]
        [--window=512] [--stride=256] [--batch_size=1] [--max_tokens=0]

The default text is a section of the Python Language Reference that every CPython install ships
as `pydoc_data.topics` (the text `help("TYPES")` prints): "The standard type hierarchy", about
8,900 SmolLM2 tokens on Python 3.11. Its wording changes a little between Python versions, so
numbers compare only on the same version; `--text=PATH` reads a UTF-8 file instead.

A mode says how the weights and the KV cache are held: `f32` and `bf16` (weights and activations in
that dtype; f32 of the GGUF file is its dequantized weights, the reference), `int8` / `int4-gN`
(linear weights quantized on load), `gguf` (the file's own quantized blocks, `quantize="gguf"`),
`w8a8` (int8 weights and dynamically quantized int8 activations), `w4a8-g32` / `w4a16-g32` (int4
weights in groups of 32 and activations rounded to 8 / 16 bits per block of 32), `int8-kv` (K/V rounded as
the int8 KV cache stores them) and the combinations `int8+int8-kv`, `w8a8+int8-kv`
(`jinfer.eval.modes`). A mode the model cannot take (a group size that does not divide a layer)
is reported as refused.
"""

import pathlib
import time

from absl import app, flags

from jinfer.defaults import default_model_path
from jinfer.eval.modes import MODES, check_modes_flag, load_mode
from jinfer.eval.perplexity import PerplexityResult, perplexity

PYDOC_PREFIX = "pydoc:"

flags.DEFINE_string("model", None, "GGUF file, HF directory or jinfer checkpoint (default: the SmolLM2 GGUF).")
flags.DEFINE_list("modes", ["f32", "bf16"], f"Modes to evaluate, in order: {', '.join(MODES)}.")
flags.DEFINE_string("text", "pydoc:types", f"'{PYDOC_PREFIX}TOPIC' (a key of pydoc_data.topics) or a text file.")
flags.DEFINE_integer("window", 512, "Tokens per forward (at most the model's context).")
flags.DEFINE_integer("stride", 256, "Tokens between window starts; each window scores its newest tokens.")
flags.DEFINE_integer("batch_size", 1, "Windows per forward.")
flags.DEFINE_integer("max_tokens", 0, "Evaluate only the text's first N tokens (0: all).")
FLAGS = flags.FLAGS


def read_text(spec: str) -> str:
    """The text named by `spec`: a pydoc topic (`pydoc:types`) or a UTF-8 file path."""
    if spec.startswith(PYDOC_PREFIX):
        from pydoc_data.topics import topics

        topic = spec.removeprefix(PYDOC_PREFIX)
        if topic not in topics:
            raise app.UsageError(f"no pydoc topic {topic!r}; topics: {', '.join(sorted(topics))}")
        return topics[topic]
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise app.UsageError(f"--text={spec!r} is neither {PYDOC_PREFIX}TOPIC nor a file")
    return path.read_text(encoding="utf-8")


def evaluate(model_path: pathlib.Path, mode: str, text: str) -> tuple[PerplexityResult, float]:
    """The perplexity of the model loaded in `mode` over `text`, and the seconds it took to score."""
    model = load_mode(model_path, mode)
    if model.tokenizer is None:
        raise app.UsageError(f"{model_path} has no tokenizer to turn the text into tokens")
    token_ids = model.tokenizer.encode(text)
    if FLAGS.max_tokens:
        token_ids = token_ids[: FLAGS.max_tokens]
    start = time.perf_counter()
    result = perplexity(model, token_ids, FLAGS.window, FLAGS.stride, FLAGS.batch_size, progress=True, kv_cache_dtype=MODES[mode].kv_cache_dtype)
    return result, time.perf_counter() - start


def main(argv):
    del argv
    check_modes_flag(FLAGS.modes)
    model_path = pathlib.Path(FLAGS.model or default_model_path())
    text = read_text(FLAGS.text)
    rows = []
    for mode in FLAGS.modes:
        try:
            rows.append((mode, *evaluate(model_path, mode, text)))
        except ValueError as error:  # a mode the model cannot take (e.g. a group size that does not divide a layer)
            rows.append((mode, error, 0.0))
    print(f"model {model_path.name}, text {FLAGS.text}, window {FLAGS.window}, stride {FLAGS.stride}")
    print(f"{'mode':<12} {'tokens':>8} {'NLL (nats)':>12} {'NLL/token':>10} {'perplexity':>11} {'time (s)':>9}")
    for mode, result, seconds in rows:
        if isinstance(result, ValueError):
            print(f"{mode:<12} refused: {result}")
            continue
        print(
            f"{mode:<12} {result.num_tokens:>8} {result.nll:>12.2f} {result.mean_nll:>10.4f} "
            f"{result.perplexity:>11.3f} {seconds:>9.1f}"
        )

if __name__ == "__main__":
    app.run(main)
