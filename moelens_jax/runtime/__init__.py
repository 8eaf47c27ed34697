"""Runtime: scheduler, weight mover, iteration layout, the Engine, sampling, run records."""

from moelens_jax.runtime.config import PIPELINES, EngineConfig
from moelens_jax.runtime.engine import Engine
from moelens_jax.runtime.layout import GroupShape, IterationShape, SplitCosts
from moelens_jax.runtime.requests import GenerationResult, Request
from moelens_jax.runtime.sampling import SamplingParams
from moelens_jax.runtime.scheduler import Plan, RequestRejected, Scheduler
from moelens_jax.runtime.stats import IterationRecord, RunStats

__all__ = ["Engine", "EngineConfig", "PIPELINES", "GenerationResult", "Request", "RunStats",
           "IterationRecord", "IterationShape", "GroupShape", "SplitCosts", "SamplingParams",
           "Plan", "RequestRejected", "Scheduler"]
