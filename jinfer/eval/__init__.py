"""Evaluation of loaded models: perplexity over a text."""

from jinfer.eval.perplexity import PerplexityResult, Window, perplexity, plan_windows

__all__ = ["PerplexityResult", "Window", "perplexity", "plan_windows"]
