"""tools/bench_reference.py without the reference: its flash_attn stand-in's rotary embedding is the
rotate-half rotation, and a directory that is no rev_udm checkout is refused before anything runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("udmtrain_tool_bench_reference", REPO / "tools" / "bench_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rotary_stand_in_rotates_channel_pairs_by_their_angle():
    """Channel j and j + r/2 of position t turn by angle[t, j] (a complex multiplication); channels >= r pass."""
    namespace: dict = {}
    exec(_tool().FLASH_ATTN_STAND_IN["layers/rotary.py"], namespace)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    angle = torch.randn(5, 2, dtype=torch.float64)  # r = 4 of 8 channels rotated
    out = namespace["apply_rotary_emb_torch"](x, angle.cos(), angle.sin())
    z = torch.complex(x[..., :2], x[..., 2:4]) * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    assert torch.allclose(out[..., :2], z.real) and torch.allclose(out[..., 2:4], z.imag)
    assert torch.equal(out[..., 4:], x[..., 4:])


def test_a_directory_that_is_no_reference_checkout_is_refused(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ddm.py").write_text("raise AssertionError('imported')\n")  # present, the rest missing
    code = _tool().main(["--reference-repo", str(tmp_path), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"--reference-repo {tmp_path} is not a checkout" in err and "src/models/dit.py" in err
    assert "ddm" not in sys.modules  # nothing of the named directory was imported
