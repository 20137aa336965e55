"""Two processes (4 fake CPU devices each, gloo collectives) serve requests over one global 8-device
mesh: process 0 schedules and broadcasts each step, both run it, and the tokens equal one process's.

This file is also the worker: `python test_multihost.py COORDINATOR NUM_PROCESSES PROCESS_ID MODEL_DIR OUT`.
"""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

PROMPTS = [[5, 17], [42], [99]]  # 4 tokens, 3 rows: prefill and decode steps share one bucket
MAX_TOKENS = 6
ENGINE_OPTIONS = dict(max_num_seqs=4, max_num_batched_tokens=4, max_model_len=32, page_size=8, kv_cache_memory="64KiB")
MODEL_OVERRIDES = dict(num_attention_heads=8, num_key_value_heads=8)  # heads and KV heads shard over model:8
DEVICES_PER_PROCESS = 4
TIMEOUT_S = 180


def worker(coordinator: str, num_processes: int, process_id: int, model_dir: str, out: str) -> None:
    """Joins the run, serves PROMPTS (process 0) or follows, and writes what this process saw."""
    from jinfer import distributed

    distributed.initialize(coordinator, num_processes, process_id)

    import jax
    import numpy as np

    from jinfer.api import LLM
    from jinfer.sampling import SamplingParams
    from jinfer.sharding import make_mesh

    llm = LLM(model_dir, mesh=make_mesh({"model": jax.device_count()}), **ENGINE_OPTIONS)
    digest, steps = hashlib.sha256(), 0
    run_batch = llm.engine.run_batch

    def recording_run_batch(batch):
        nonlocal steps
        output = run_batch(batch)
        digest.update(np.asarray(output.sampled.tokens).tobytes())  # [rows] int32, this process's copy
        steps += 1
        return output

    llm.engine.run_batch = recording_run_batch
    result = {"process_index": jax.process_index(), "devices": jax.device_count(), "local_devices": jax.local_device_count()}
    if distributed.is_leader():
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
        llm.stop_followers()
        result["tokens"] = [output.outputs[0].token_ids for output in outputs]
    else:
        result["followed"] = llm.follow()
    result.update(digest=digest.hexdigest(), steps=steps)
    pathlib.Path(out).write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_workers(model_dir: pathlib.Path, tmp_path: pathlib.Path, num_processes: int) -> list[tuple[subprocess.Popen, pathlib.Path]]:
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}", "JAX_PLATFORMS": "cpu"}
    workers = []
    for process_id in range(num_processes):
        out = tmp_path / f"process_{process_id}.json"
        log = open(tmp_path / f"process_{process_id}.log", "w")
        command = [sys.executable, __file__, coordinator, str(num_processes), str(process_id), str(model_dir), str(out)]
        workers.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), out))
    return workers


def _wait_all(workers, tmp_path: pathlib.Path) -> list[dict]:
    """Each worker's result; on a failure or timeout every worker is killed and the logs are shown."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for process, _ in workers:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process, _ in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    logs = "\n".join(f"--- process {i}\n" + (tmp_path / f"process_{i}.log").read_text()[-3000:] for i in range(len(workers)))
    codes = [process.returncode for process, _ in workers]
    assert codes == [0] * len(workers), f"worker exit codes {codes}\n{logs}"
    return [json.loads(out.read_text()) for _, out in workers]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    from hf_reference import save_tiny_model

    directory = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", directory, overrides=MODEL_OVERRIDES)
    return directory


def test_two_processes_serve_like_one(model_dir, tmp_path):
    import jinfer

    workers = _start_workers(model_dir, tmp_path, num_processes=2)
    single = jinfer.load(model_dir)
    expected = [single.greedy_continuation(prompt, MAX_TOKENS) for prompt in PROMPTS]
    leader, follower = _wait_all(workers, tmp_path)
    assert [leader["process_index"], follower["process_index"]] == [0, 1]
    assert leader["devices"] == follower["devices"] == 2 * DEVICES_PER_PROCESS
    assert leader["local_devices"] == follower["local_devices"] == DEVICES_PER_PROCESS
    assert leader["tokens"] == expected
    assert follower["followed"] == follower["steps"] == leader["steps"] >= MAX_TOKENS
    assert follower["digest"] == leader["digest"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("10.0.0.1", 2, 0), "coordinator_address='10.0.0.1' must be HOST:PORT"),
        (("10.0.0.1:1234", 0, None), "num_processes=0 must be at least 1"),
        (("10.0.0.1:1234", 2, 2), r"process_id=2 must be in \[0, 2\)"),
    ],
)
def test_bad_distributed_arguments_are_named(arguments, message):
    from jinfer import distributed

    with pytest.raises(ValueError, match=message):
        distributed.initialize(*arguments)


def test_follow_needs_a_multi_process_run(model_dir):
    import jinfer
    from jinfer.config import EngineConfig
    from jinfer.engine import multihost
    from jinfer.engine.engine import Engine

    engine = Engine(jinfer.load(model_dir), EngineConfig(**ENGINE_OPTIONS), measure_step_memory=False)
    assert engine.multihost is None
    with pytest.raises(ValueError, match="follow\\(\\) needs a multi-process run"):
        multihost.follow(engine)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
