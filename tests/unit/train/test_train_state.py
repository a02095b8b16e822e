"""TrainState round trip and RNG capture/restore (python, numpy, torch)."""

import random

import numpy as np
import pytest
import torch

from udmtrain.train.state import FORMAT_VERSION, TrainState
from udmtrain.utils.rng import capture_rng_state, restore_rng_state
from udmtrain.utils.seed import derive_seed, seed_everything


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_restore_replays_every_generator():
    seed_everything(7)
    state = capture_rng_state()
    first = _draw()
    _draw()
    restore_rng_state(state)
    assert _draw() == first


def test_rng_survives_torch_save(tmp_path):
    state = capture_rng_state()
    first = _draw()
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False))
    assert _draw() == first


def test_train_state_round_trip_is_deep():
    s = TrainState(step=5, tokens_seen=640, num_nonfinite=1, total_skipped=2, data_cursor={"shard": 3, "offset": [1, 2]},
                   ema={"w": torch.ones(2)}, rng=capture_rng_state())
    d = s.state_dict()
    assert d["format_version"] == FORMAT_VERSION
    s.data_cursor["offset"].append(9)  # the snapshot must not alias live state
    t = TrainState()
    t.load_state_dict(d)
    assert (t.step, t.tokens_seen, t.num_nonfinite, t.total_skipped) == (5, 640, 1, 2)
    assert t.data_cursor == {"shard": 3, "offset": [1, 2]} and torch.equal(t.ema["w"], torch.ones(2))


def test_train_state_rejects_unknown_and_newer():
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        TrainState().load_state_dict({"bogus": 1})
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        TrainState().load_state_dict({"format_version": 99})


def test_derive_seed_is_stable_and_key_dependent():
    assert derive_seed(1, "data", 0) == derive_seed(1, "data", 0)
    assert len({derive_seed(1, "data", r) for r in range(8)} | {derive_seed(2, "data", 0)}) == 9
    assert 0 <= derive_seed(1) < 2**63
