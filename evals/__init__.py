"""Evaluation with lm-eval: importing this package registers our model with lm-eval as ``dsmoe``."""

from dsmoe.evals.lm_model import DsmoeLM

__all__ = ["DsmoeLM"]
