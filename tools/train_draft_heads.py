"""Trains Medusa-style draft heads (`jinfer.draft_heads`) on a target model's own greedy outputs.

    python tools/train_draft_heads.py [--model=PATH] [--output=draft_heads.safetensors] [--num_heads=4]
        [--num_prompts=64] [--max_tokens=64] [--steps=400] [--learning_rate=1e-3] [--batch_size=32]

1. The engine (`jinfer.engine.Engine`) generates greedy continuations of chat prompts (built-in instructions crossed with
   topics, or --prompts_file with one prompt per line): the target's own outputs.
2. A full-sequence forward gives the final hidden state h_t at every position whose next token the
   target generated; head i learns token t+1+i from h_t.
3. adamw (optax) on the heads' cross-entropy; the target stays fixed. The last --holdout of the
   prompts are held out: a table of each head's top-1 accuracy there, untrained (every head equals
   the LM head) and trained.
4. The heads are saved for `--speculative=heads --draft_heads=PATH`.

The built-in prompts leave out the benchmark's decode prompt (`jinfer.bench.DECODE_MESSAGE`), so
`jinfer bench --speculative=heads` measures on a prompt the heads never saw.
"""

import itertools
import pathlib
import random
import time

from absl import app, flags, logging
from tqdm import tqdm

from jinfer import draft_heads
from jinfer.config import EngineConfig
from jinfer.defaults import default_model_path
from jinfer.engine.engine import Engine
from jinfer.model import Model, load
from jinfer.sampling import SamplingParams

TASKS = (
    "Write a short story about {}.",
    "Explain {} to a ten-year-old.",
    "Give three practical tips about {}.",
    "Describe the history of {} in a few sentences.",
    "Write a short poem about {}.",
    "What are the pros and cons of {}?",
)
TOPICS = (
    "the ocean", "bicycles", "learning a new language", "volcanoes", "coffee", "the moon", "gardening", "trains",
    "honey bees", "chess", "rainy days", "baking bread", "mountains", "friendship", "libraries", "electric cars",
)

flags.DEFINE_string("model", None, "Target: GGUF file, HF directory or jinfer checkpoint (default: the SmolLM2 GGUF).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype of the target.")
flags.DEFINE_string("output", "draft_heads.safetensors", "Where to write the heads checkpoint.")
flags.DEFINE_integer("num_heads", 4, "Draft heads H: speculation can then use k <= H.")
flags.DEFINE_integer("num_prompts", 64, "Prompts to generate from (training and held-out together).")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line (default: the built-in instructions).")
flags.DEFINE_float("holdout", 0.25, "Fraction of the prompts whose positions are held out for the accuracy table.")
flags.DEFINE_integer("max_tokens", 64, "Greedy tokens generated per prompt.")
flags.DEFINE_integer("steps", 400, "adamw steps.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (cosine decay to 0).")
flags.DEFINE_integer("batch_size", 32, "Positions per step.")
flags.DEFINE_integer("seed", 0, "Seed of the prompt order, the heads' initialisation and the batches.")
FLAGS = flags.FLAGS


def read_prompts(count: int, seed: int) -> list[str]:
    """`count` prompts: the file's lines in order, or the built-in instructions in a seeded order."""
    if FLAGS.prompts_file is not None:
        lines = pathlib.Path(FLAGS.prompts_file).expanduser().read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = [task.format(topic) for task, topic in itertools.product(TASKS, TOPICS)]
        random.Random(seed).shuffle(prompts)
    if len(prompts) < count:
        raise app.UsageError(f"--num_prompts={count} but only {len(prompts)} prompts are available")
    return prompts[:count]


def generate(model: Model, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], list[int]]:
    """The chat-templated prompts with their greedy continuations (the engine, up to 32 at a time),
    and the prompt lengths."""
    tokenizer = model.tokenizer
    chats = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False) for p in prompts]
    page_size = 16
    longest = max(map(len, chats)) + max_tokens + 1
    config = EngineConfig(max_num_seqs=min(32, len(chats)), max_model_len=-(-longest // page_size) * page_size, max_num_batched_tokens=512, page_size=page_size)
    engine = Engine(model, config, measure_step_memory=False)
    requests = [engine.add_request(chat, SamplingParams(temperature=0.0, max_tokens=max_tokens)) for chat in chats]
    with tqdm(total=len(requests), desc="generating", unit="seq") as bar:
        while engine.has_unfinished():
            bar.update(sum(event.finished for event in engine.step()))
    return [r.token_ids for r in requests], [len(chat) for chat in chats]


def accuracy_table(before, after) -> str:
    rows = [("head", "predicts", "untrained", "trained")]
    rows += [(str(i + 1), f"t+{i + 2}", f"{b:.3f}", f"{a:.3f}") for i, (b, a) in enumerate(zip(before, after))]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv):
    del argv
    start = time.perf_counter()
    path = FLAGS.model if FLAGS.model is not None else str(default_model_path())
    prompts = read_prompts(FLAGS.num_prompts, FLAGS.seed)
    held_out = max(1, round(FLAGS.holdout * len(prompts)))
    if held_out >= len(prompts):
        raise app.UsageError(f"--holdout={FLAGS.holdout} leaves no training prompts out of {len(prompts)}")
    model = load(path, dtype=FLAGS.dtype)
    if model.tokenizer is None:
        raise app.UsageError(f"{path} has no tokenizer: the prompts are text")
    sequences, prompt_lens = generate(model, prompts, FLAGS.max_tokens)
    logging.info("generated %d tokens in %.1f s", sum(len(s) - n for s, n in zip(sequences, prompt_lens)), time.perf_counter() - start)

    split = len(prompts) - held_out
    examples = [
        draft_heads.training_examples(model.params, model.config, model.dtype, sequences[part], prompt_lens[part], FLAGS.num_heads)
        for part in (slice(0, split), slice(split, None))
    ]
    (train_hidden, train_targets), (test_hidden, test_targets) = examples
    logging.info("%d training positions, %d held-out positions", len(train_hidden), len(test_hidden))

    untrained = draft_heads.init_heads(FLAGS.num_heads, model.config.hidden_size, model.config.vocab_size, FLAGS.seed)
    before = draft_heads.head_accuracy(untrained, model.params, model.config, model.dtype, test_hidden, test_targets)
    with tqdm(total=FLAGS.steps, desc="training heads", unit="step") as bar:

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        trained = draft_heads.train_heads(
            untrained, model.params, model.config, model.dtype, train_hidden, train_targets,
            steps=FLAGS.steps, learning_rate=FLAGS.learning_rate, batch_size=FLAGS.batch_size, seed=FLAGS.seed, on_step=on_step,
        )
    after = draft_heads.head_accuracy(trained, model.params, model.config, model.dtype, test_hidden, test_targets)
    output = draft_heads.save_heads(FLAGS.output, trained)
    print(f"top-1 accuracy on {len(test_hidden)} held-out positions ({held_out} prompts):")
    print(accuracy_table(before, after))
    print(f"wrote {output} in {time.perf_counter() - start:.0f} s; use --speculative=heads --draft_heads={output}")


if __name__ == "__main__":
    app.run(main)
