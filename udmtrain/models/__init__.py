"""Networks: ``dit`` (diffusion transformer) and ``ar_transformer`` (AR baseline), registered in
``udmtrain.registry.MODEL``; ``attention`` (the only flash_attn importer), ``layers``, ``ema``, ``flops``."""
