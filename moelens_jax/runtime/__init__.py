"""The runtime: the resource-aware scheduler, sampling, and the Engine that executes plans."""

from moelens_jax.runtime.engine import Engine, GenerationResult, Request, RunStats
from moelens_jax.runtime.sampling import SamplingParams
from moelens_jax.runtime.scheduler import Plan, RequestRejected, Scheduler

__all__ = ["Engine", "GenerationResult", "Plan", "Request", "RequestRejected", "RunStats",
           "SamplingParams", "Scheduler"]
