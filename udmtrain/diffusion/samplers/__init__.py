"""Samplers (docs/architecture.md "Samplers"); the sampler registry imports every module of this package,
so a new sampler is one new file here.

Registered names and the process capabilities they need (``udmtrain.diffusion.process.CAPABILITIES``):
``ancestral`` (none: the process's own reverse step), ``max_coupling`` (token_states), ``remdm``
(mask_state), ``reaudm`` (noise_tokens), ``pc_gibbs`` (gibbs_corrector + its predictor's),
``confidence`` (none).
"""

from udmtrain.diffusion.samplers.base import SampleOutput, Sampler, SamplingRun

__all__ = ["SampleOutput", "Sampler", "SamplingRun"]
