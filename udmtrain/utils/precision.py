"""``engine.precision: auto``: bf16 where the hardware multiplies bf16 natively, fp32 elsewhere.

bf16 autocast pays off only with native bf16 units: a CUDA GPU that supports bf16, or a CPU with
AVX512-BF16 or AMX. A CPU without them emulates bf16 matmuls, measured ~4x slower than fp32 (docs/perf.md),
so ``auto`` picks fp32 there. ``load_recipe`` resolves ``auto`` once, so every later reader (the engine,
autocast, checkpoints, the resume check) sees the concrete precision the run uses and records.
"""

from __future__ import annotations

AUTO = "auto"


def native_bf16() -> tuple[bool, str]:
    """``(True, why)`` when the device a run here trains on (CUDA if available, else the CPU) has bf16 units."""
    import torch

    if torch.cuda.is_available():
        ok = bool(torch.cuda.is_bf16_supported())
        name = torch.cuda.get_device_name(0)
        return ok, f"CUDA device {name} {'supports' if ok else 'does not support'} bf16"
    for probe, unit in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        check = getattr(torch.cpu, probe, None)  # private torch probes; absent in some versions: then fp32
        if check is not None and check():
            return True, f"CPU with {unit}"
    return False, "CPU without bf16 units (no AVX512-BF16 or AMX)"


def resolve_precision(precision: str) -> tuple[str, str | None]:
    """``(concrete precision, why)`` for a recipe's ``engine.precision``; ``why`` is None unless it was ``auto``."""
    if precision != AUTO:
        return precision, None
    ok, why = native_bf16()
    return ("bf16" if ok else "fp32"), why
