"""jinfer: a JAX/XLA inference runtime for large language models."""

from jinfer.api import LLM, RequestOutput, StreamChunk
from jinfer.config import EngineConfig, ModelConfig
from jinfer.model import Model, load
from jinfer.sampling import SamplingParams
from jinfer.speculative import SpeculativeConfig

__all__ = ["LLM", "EngineConfig", "Model", "ModelConfig", "RequestOutput", "SamplingParams", "SpeculativeConfig", "StreamChunk", "load"]
