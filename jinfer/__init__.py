"""jinfer: a JAX/XLA inference runtime for large language models."""

from jinfer.config import ModelConfig
from jinfer.model import Model, load

__all__ = ["Model", "ModelConfig", "load"]
