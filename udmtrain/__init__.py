"""udmtrain: distributed pretraining of discrete diffusion language models.

`import udmtrain` imports nothing heavy; the families are imported lazily by the registry.
"""

__version__ = "0.1.0"
