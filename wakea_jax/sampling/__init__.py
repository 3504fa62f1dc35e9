"""Sampling: a jitted, donated-cache sampler (prefill + while_loop decode), continuous batching."""

from wakea_jax.sampling.batching import ContinuousBatcher
from wakea_jax.sampling.sampler import DecodeState, SampleOutput, Sampler

__all__ = ["ContinuousBatcher", "DecodeState", "SampleOutput", "Sampler"]
