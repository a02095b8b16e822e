"""Samplers (docs/architecture.md "Samplers"); importing this package registers every sampler.

Registered names: ``ancestral`` (MDLM / UDLM plug-in bridge / AUDM, per process), ``max_coupling``
(uniform), ``remdm`` (masked), ``reaudm`` (absorbing_uniform), ``pc_gibbs`` (uniform,
absorbing_uniform), ``confidence`` (all).
"""

from udmtrain.diffusion.samplers import ancestral, confidence, pc, reaudm, remdm  # noqa: F401  (registration)
from udmtrain.diffusion.samplers.base import SampleOutput, Sampler, SamplingRun, process_kind

__all__ = ["SampleOutput", "Sampler", "SamplingRun", "process_kind"]
