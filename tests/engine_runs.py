"""Running an engine over a set of prompts until every request finishes (shared by the engine tests)."""

from collections.abc import Sequence

from jinfer.engine.request import Request
from jinfer.sampling import SamplingParams


def run_to_completion(engine, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams]) -> list[Request]:
    """Adds each prompt (with `params`, or its own entry of a list of them) and steps until all finish."""
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    requests = [engine.add_request(prompt, prompt_params) for prompt, prompt_params in zip(prompts, per_prompt)]
    while engine.has_unfinished():
        engine.step()
    return requests
