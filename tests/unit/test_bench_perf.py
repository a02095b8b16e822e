"""``tools/bench.py sample`` / ``memory`` and ``tools/gpu_perf.py``'s doc writer: real runs on tiny
networks (subprocess, as a user runs them), their JSON fields and arithmetic."""

from __future__ import annotations

import json
import math
import sys

from test_bench import REPO, _run

TINY_NET = ["model.hidden_size=32", "model.num_blocks=1", "model.num_heads=2", "model.cond_dim=16",
            "engine.precision=fp32"]


def test_bench_sample_reports_nfe_rate_and_network_split(tmp_path):
    out = tmp_path / "sample.json"
    proc = _run(["tools/bench.py", "sample", "--recipe", "recipes/absorbing_udm.yaml", "--vocab-size", "50",
                 "--batch-size", "2", "--seq-len", "16", "--steps", "3", "--repeats", "2", "--warmup", "0",
                 "--sampler", "ancestral,reaudm", "--device", "cpu", "--out", str(out), *TINY_NET])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["bench"] == "sample" and set(report["samplers"]) == {"ancestral", "reaudm"}
    assert (report["batch_size"], report["seq_len"], report["num_states"]) == (2, 16, 50)
    for res in report["samplers"].values():
        assert len(res["runs"]) == 2 and res["nfe"] == 3
        for run in res["runs"]:
            assert math.isclose(run["nfe_per_s"], run["nfe"] / run["seconds"], rel_tol=1e-12)
            assert math.isclose(run["tokens_per_s"], 2 * 16 / run["seconds"], rel_tol=1e-12)
            assert 0 < run["network_s"] < run["seconds"] and 0 < run["overhead_fraction"] < 1


def test_bench_sample_unknown_sampler_is_a_clear_error():
    proc = _run(["tools/bench.py", "sample", "--recipe", "recipes/mdlm.yaml", "--vocab-size", "50", "--sampler",
                 "reaudm", "--device", "cpu", *TINY_NET])
    assert proc.returncode != 0 and "reaudm" in proc.stderr, proc.stderr[-2000:]


def test_bench_memory_sliced_path_uses_less_than_reference(tmp_path):
    out = tmp_path / "memory.json"
    # 256 x 2 positions x 20000 states: a float32 [B, L, V] is 41 MB, well above allocator noise
    proc = _run(["tools/bench.py", "memory", "--vocab-size", "20000", "--batch-size", "2", "--seq-len", "256",
                 "--cases", "uniform:loo:plugin_nelbo", "--chunk-elements", "0,1000000", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, sliced = json.loads(out.read_text())["rows"]
    assert (ref["chunk_elements"], sliced["chunk_elements"]) == (0, 1000000)
    assert math.isclose(ref["loss"], sliced["loss"], rel_tol=1e-5)
    assert sliced["peak_delta_bytes"] < 0.6 * ref["peak_delta_bytes"]
    assert ref["peak_delta_bytes_per_token"] == ref["peak_delta_bytes"] / 512


def test_gpu_perf_write_section_replaces_between_markers(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    from gpu_perf import BEGIN, END, write_section

    doc = tmp_path / "perf.md"
    doc.write_text("# Perf\n\nintro\n")
    write_section(doc, "| a |\n")
    write_section(doc, "| b |\n")
    text = doc.read_text()
    assert text.startswith("# Perf\n\nintro\n") and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "| b |" in text and "| a |" not in text
