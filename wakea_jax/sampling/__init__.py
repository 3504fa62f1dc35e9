"""Sampling: a jitted, donated-cache sampler (prefill + while_loop decode)."""

from wakea_jax.sampling.sampler import DecodeState, SampleOutput, Sampler

__all__ = ["DecodeState", "SampleOutput", "Sampler"]
