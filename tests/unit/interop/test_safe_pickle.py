"""The restricted unpickler: reads the reference checkpoints (OmegaConf config, a pickled class of
the reference code) without omegaconf and without importing or executing anything they name."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys

import pytest
import torch

from interop_helpers import FIXTURES, fixture
from udmtrain.interop.safe_pickle import Placeholder, UnsafeCheckpointError, plain, safe_load


class _Payload:
    """Unpickling this runs ``os.system(command)`` with ordinary pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def test_planted_payload_is_not_executed(tmp_path):
    marker, marker2 = tmp_path / "pwned", tmp_path / "pwned2"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Payload(f"touch {marker}"),
                "exec": _Exec(f"open({str(marker2)!r}, 'w').write('x')")}, path)
    obj = safe_load(path)
    assert not marker.exists() and not marker2.exists()
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    assert isinstance(obj["payload"], Placeholder) and type(obj["payload"]).ref_name == "system"
    assert obj["payload"].args == (f"touch {marker}",)  # kept as inert data
    assert type(obj["exec"]).ref_name == "exec"  # __builtin__.exec under pickle protocol 2
    # the same file really is dangerous for an ordinary loader (so the test above can fail)
    torch.load(path, weights_only=False)
    assert marker.exists() and marker2.exists()


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_checkpoint_reads_without_omegaconf_or_reference_code(name):
    assert importlib.util.find_spec("omegaconf") is None, "the test environment must not have omegaconf"
    with pytest.raises(Exception):  # weights_only refuses it: it is a real reference checkpoint
        torch.load(fixture(name), weights_only=True)
    obj = safe_load(fixture(name))
    assert "omegaconf" not in sys.modules and "ddm" not in sys.modules
    hp = obj["hyper_parameters"]
    assert isinstance(hp["config"], Placeholder) and type(hp["config"]).ref_name == "DictConfig"
    assert issubclass(hp["diffusion_model"], Placeholder) and hp["diffusion_model"].ref_module == "ddm"
    config = plain(hp["config"])
    assert config["model"]["hidden_size"] == 32 and config["algo"]["name"] in name.replace("_", "")[:4] + "audm"
    assert all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values())


def test_fresh_interpreter_imports_nothing_foreign():
    """In a clean process, reading a fixture imports neither omegaconf nor the reference's modules."""
    code = ("import sys; from udmtrain.interop.safe_pickle import safe_load; "
            f"safe_load({str(fixture('audm_shared_mlp'))!r}); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('omegaconf', 'ddm', 'lightning', "
            "'pytorch_lightning', 'hydra')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})


def test_legacy_and_missing_files_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(UnsafeCheckpointError, match="not a torch zip archive"):
        safe_load(legacy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_load(tmp_path / "nope.ckpt")
