"""The `jinfer` command: `jinfer generate`, `jinfer convert`."""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "GGUF file, HF safetensors directory, jinfer checkpoint or preset (default: SmolLM2-135M-Instruct).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.DEFINE_string("prompt", None, "generate: the prompt (else --prompt_file, else stdin).")
flags.DEFINE_string("prompt_file", None, "generate: a file with one prompt per line.")
flags.DEFINE_integer("max_tokens", 64, "generate: most tokens to produce per prompt.")
flags.DEFINE_bool("chat", True, "generate: wrap each prompt as a user message in the model's chat template.")
flags.DEFINE_string("output", None, "convert: directory for the jinfer checkpoint.")
flags.DEFINE_bool("parity", True, "convert: finish with a parity report against the source.")

COMMANDS = ("generate", "convert")


def _model_path() -> str:
    from jinfer.defaults import default_model_path

    return FLAGS.model or str(default_model_path())


def _prompts() -> list[str]:
    if FLAGS.prompt is not None:
        return [FLAGS.prompt]
    if FLAGS.prompt_file is not None:
        with open(FLAGS.prompt_file, encoding="utf-8") as file:
            return [line.rstrip("\n") for line in file if line.strip()]
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def generate() -> None:
    import jinfer

    model = jinfer.load(_model_path(), dtype=FLAGS.dtype)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise app.UsageError(f"model {_model_path()!r} has no tokenizer: text generation needs one")
    for prompt in _prompts():
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if FLAGS.chat and tokenizer.chat_template else prompt
        ids = tokenizer.encode(text, add_special_tokens=not FLAGS.chat)
        start = time.perf_counter()
        output = model.greedy_continuation(ids, FLAGS.max_tokens, tokenizer.eos_token_ids)
        logging.info("%d tokens in %.2f s", len(output), time.perf_counter() - start)
        print(tokenizer.decode(output), flush=True)


def convert() -> None:
    from jinfer import load
    from jinfer.checkpoint.convert import convert as convert_checkpoint
    from jinfer.checkpoint.convert import format_report, parity_report

    if not FLAGS.output:
        raise app.UsageError("convert needs --output=DIRECTORY")
    source = _model_path()
    convert_checkpoint(source, FLAGS.output, FLAGS.dtype)
    if FLAGS.parity:
        print(format_report(*parity_report(source, load(FLAGS.output, dtype=FLAGS.dtype))))


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: jinfer {{{'|'.join(COMMANDS)}}} [--flags]; got {argv[1:]}")
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments {argv[2:]}")
    {"generate": generate, "convert": convert}[argv[1]]()


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
