"""EMA: warm-up decay math, exact state round trip, exact swap/restore, loud mismatches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from udmtrain.models.ema import EMA


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))


def test_warmup_decay_and_update_math():
    net = model()
    ema = EMA(net, decay=0.9)
    expected = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    decays = []
    for step in range(1, 100):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.9, (1 + step) / (10 + step))
        decays.append(ema.current_decay())
        ema.update(net)
        for n, p in net.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach().double()
    assert decays[0] == pytest.approx(2 / 11) and decays[-1] == 0.9
    assert ema.num_updates == 99
    for n, t in ema.shadow.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.double(), expected[n], atol=1e-5, rtol=1e-5)


def test_bf16_model_keeps_fp32_shadow():
    net = model().to(torch.bfloat16)
    ema = EMA(net, decay=0.5)
    ema.update(net)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())


def test_state_dict_round_trip_is_exact():
    net = model()
    ema = EMA(net)
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        ema.update(net)
    state = ema.state_dict()
    other = EMA(model(seed=1), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == ema.decay and other.num_updates == 3
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    # continuing both gives identical results
    ema.update(net)
    other.update(net)
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    # the state is a copy, not a view of the live shadow
    assert not torch.equal(state["shadow"]["0.weight"], ema.shadow["0.weight"])


def test_swap_into_uses_ema_weights_and_restores_exactly():
    net = model()
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(5, 3)
    with ema.swap_into(net) as swapped:
        assert swapped is net
        assert torch.equal(net[0].weight, ema.shadow["0.weight"])
        ema_out = net(x)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    assert not torch.allclose(ema_out, net(x))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap_into(net):
            raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_mismatches_fail_loudly():
    ema = EMA(model())
    with pytest.raises(KeyError, match="parameter names differ"):
        ema.update(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(RuntimeError, match="has shape"):
        ema.update(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2, bias=False)))
    partitioned = model()
    partitioned[0].weight.data = torch.empty(0)  # what a ZeRO-3 placeholder looks like
    with pytest.raises(RuntimeError, match="ZeRO-3 partitioned"):
        ema.update(partitioned)
    bad = ema.state_dict()
    bad["shadow"].pop("1.weight")
    with pytest.raises(KeyError, match="missing"):
        ema.load_state_dict(bad)
    with pytest.raises(ValueError, match="decay"):
        EMA(model(), decay=1.0)
