"""Parameter names of the reference DiT (rev_udm / MDLM / UDLM / DUO "DIT") <-> udmtrain's ``DiT``.

Both networks compute the same function (docs/interop.md walks through it): token table, sinusoidal
time features -> MLP -> SiLU, pre-LN adaLN-Zero blocks with a fused ``[q; k; v]`` projection laid out
``(3, heads, head_dim)``, rotate-half RoPE with base 1e4 over the full head dim, and an adaLN head. So
the conversion is a renaming, one tensor to one tensor, plus two checks:

* the reference keeps RoPE's ``inv_freq`` as a buffer; it must equal udmtrain's (base 1e4);
* a uniform / absorbing-uniform head one row wider than the tokenizer's V (GPT-2 models that added a
  ``[PAD]`` token, id V) is cut to exactly V rows: udmtrain uses one V everywhere, so this equals the
  reference with that extra logit at -inf (docs/interop.md "One V").

``name_pairs`` lists the pairs in the reference's registration order, which is also the order of its
``parameters()`` and therefore of the EMA's ``shadow_params`` list.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from udmtrain.interop.errors import InteropError

ROPE_BUFFER = "rotary_emb.inv_freq"
"""The reference's only buffer (RoPE inverse frequencies); recomputed by udmtrain, checked on import."""

FUSION_KEYS: dict[str, list[tuple[str, str]]] = {
    "none": [],
    "separate_linear": [
        ("conditioning_vocab_embed.embedding", "noise_conditioner.noise_embedding.weight"),
        ("conditioning_input_proj.weight", "noise_conditioner.fuse.weight"),
        ("conditioning_input_proj.bias", "noise_conditioner.fuse.bias"),
    ],
    "shared_mlp": [
        (f"conditioning_input_mlp.{i}.{p}", f"noise_conditioner.fuse.{i}.{p}")
        for i in (0, 2) for p in ("weight", "bias")
    ],
}
"""AUDM input fusion (``algo.conditioning_fusion``) -> its extra parameters (reference, udmtrain)."""

VOCAB_ROWS = ("vocab_embed.embedding", "conditioning_vocab_embed.embedding", "output_layer.linear.weight",
              "output_layer.linear.bias")
"""Reference tensors whose first dimension is the vocabulary (cut to V by ``to_udmtrain``)."""


class KeyMappingError(InteropError):
    """Unexpected, missing or mis-shaped tensors between the reference DiT and udmtrain's."""


def name_pairs(num_blocks: int, fusion: str) -> list[tuple[str, str]]:
    """``[(reference name, udmtrain name)]`` of every parameter, in the reference's ``parameters()`` order."""
    if fusion not in FUSION_KEYS:
        raise KeyMappingError(f"unknown AUDM conditioning fusion {fusion!r}; supported: {sorted(FUSION_KEYS)}")
    pairs = [("vocab_embed.embedding", "embedding.weight"), *FUSION_KEYS[fusion]]
    pairs += [(f"sigma_map.mlp.{i}.{p}", f"time_embedding.mlp.{i}.{p}") for i in (0, 2) for p in ("weight", "bias")]
    for b in range(num_blocks):
        ref, udm = f"blocks.{b}.", f"blocks.{b}."
        pairs += [(ref + "norm1.weight", udm + "norm1.weight"), (ref + "attn_qkv.weight", udm + "attn.qkv.weight"),
                  (ref + "attn_out.weight", udm + "attn.out.weight"), (ref + "norm2.weight", udm + "norm2.weight")]
        pairs += [(f"{ref}mlp.{i}.{p}", f"{udm}mlp.{name}.{p}") for i, name in ((0, "fc1"), (2, "fc2"))
                  for p in ("weight", "bias")]
        pairs += [(f"{ref}adaLN_modulation.{p}", f"{udm}adaLN.{p}") for p in ("weight", "bias")]
    pairs += [("output_layer.norm_final.weight", "final.norm.weight")]
    pairs += [(f"output_layer.{r}.{p}", f"final.{u}.{p}") for r, u in (("linear", "linear"),
                                                                      ("adaLN_modulation", "adaLN"))
              for p in ("weight", "bias")]
    return pairs


def rope_inv_freq(head_dim: int, base: float = 1e4) -> torch.Tensor:
    """fp32 ``base^(-2k/head_dim)``, k = 0 .. head_dim/2 - 1 (the reference's ``inv_freq`` buffer)."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def to_udmtrain(ref_state: Mapping[str, torch.Tensor], model: torch.nn.Module, fusion: str, *,
                drop_extra_row: bool, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The reference backbone's tensors (names without prefix) -> ``model.state_dict()`` names, fp32.

    ``model`` is the udmtrain ``DiT`` built from the derived recipe (it fixes every expected shape).
    Raises ``KeyMappingError`` naming every unexpected or missing key and every shape mismatch; the
    only shape change allowed is dropping the last vocabulary row (``VOCAB_ROWS``) when the reference
    is exactly one row wider than ``model.vocab_size`` and ``drop_extra_row`` (the caller allows it for
    the uniform and absorbing-uniform processes, never for the masked one, whose extra row is its mask).
    """
    target = model.state_dict()
    num_blocks = int(model.num_blocks)
    pairs = dict(name_pairs(num_blocks, fusion))
    unexpected = sorted(set(ref_state) - set(pairs) - {ROPE_BUFFER})
    missing = sorted(set(pairs) - set(ref_state))
    if unexpected or missing:
        raise KeyMappingError(f"{where}: the backbone's tensors do not match a {num_blocks}-block DiT with "
                              f"conditioning fusion {fusion!r}: unexpected {unexpected[:6]}, missing {missing[:6]}")
    if ROPE_BUFFER in ref_state:
        head_dim = int(model.blocks[0].attn.head_dim) if num_blocks else 0
        expected = rope_inv_freq(head_dim)
        got = ref_state[ROPE_BUFFER].float()
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-6, atol=0):
            raise KeyMappingError(f"{where}: {ROPE_BUFFER} is not RoPE base 1e4 over head_dim {head_dim}; "
                                  "udmtrain's DiT cannot express another rotary convention")
    out, problems = {}, []
    vocab = int(model.vocab_size)
    for ref_name, udm_name in pairs.items():
        tensor = ref_state[ref_name].detach().to(torch.float32)
        want = tuple(target[udm_name].shape)
        if drop_extra_row and ref_name in VOCAB_ROWS and tensor.shape[0] == vocab + 1 and want[0] == vocab:
            tensor = tensor[:vocab]
        if tuple(tensor.shape) != want:
            problems.append(f"{ref_name} {tuple(tensor.shape)} -> {udm_name} {want}")
        out[udm_name] = tensor.contiguous().clone()
    if problems:
        raise KeyMappingError(f"{where}: shape mismatch (reference -> udmtrain): " + "; ".join(problems[:6]))
    return out


def to_reference(udm_state: Mapping[str, torch.Tensor], num_blocks: int, fusion: str,
                 head_dim: int) -> dict[str, torch.Tensor]:
    """udmtrain ``DiT`` parameters -> the reference backbone's ``state_dict`` (registration order, RoPE
    buffer included), fp32 copies. Raises ``KeyMappingError`` for unexpected or missing names."""
    pairs = name_pairs(num_blocks, fusion)
    udm_names = {u for _, u in pairs}
    unexpected, missing = sorted(set(udm_state) - udm_names), sorted(udm_names - set(udm_state))
    if unexpected or missing:
        raise KeyMappingError(f"udmtrain weights do not match a {num_blocks}-block DiT with fusion {fusion!r}: "
                              f"unexpected {unexpected[:6]}, missing {missing[:6]}")
    out: dict[str, torch.Tensor] = {}
    for ref_name, udm_name in pairs:
        if ref_name.startswith("blocks.0.") and ROPE_BUFFER not in out:
            out[ROPE_BUFFER] = rope_inv_freq(head_dim)  # registered between sigma_map and blocks
        out[ref_name] = udm_state[udm_name].detach().to("cpu", torch.float32).contiguous().clone()
    return out
