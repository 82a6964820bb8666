"""The benchmark scripts run (tiny sizes) so they cannot rot. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-P", str(BENCH / script), "--quick", "--repeats", "1", "--warmup", "0", "--threads", "1",
           "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_bert_packed_vs_hf(tmp_path):
    result = _run("bert_packed_vs_hf.py", tmp_path / "bert.json")
    assert result["max_abs_diff_ok"] is True
    assert set(result["real_tokens_per_s"]) == {"hf_sdpa_padded", "energon_packed"}
    assert result["ratio_energon_over_hf"] > 0


def test_generate_vs_hf(tmp_path):
    result = _run("generate_vs_hf.py", tmp_path / "gen.json", "--batches", "1", "3")
    assert set(result["runs"]) == {"1", "3"}
    for run in result["runs"].values():
        assert run["same_tokens"] is True and run["ratio"] > 0


def test_gpu_kernels_script(tmp_path):
    """The GPU check runs end to end on tiny sizes through the Triton interpreter: every kernel matched."""
    pytest.importorskip("triton")
    result = _run("gpu_kernels.py", tmp_path / "gpu.json")
    assert result["device"].startswith("cpu")
    assert {"remove_padding", "varlen_attention_equal", "paged_attention_decode", "rms_norm"} <= set(result["kernels"])
    assert all(figures.get("matched", True) for figures in result["kernels"].values())


def test_tp_latency(tmp_path):
    result = _run("tp_latency.py", tmp_path / "tp.json")
    assert result["max_abs_diff_tp2_vs_tp1"] < 1e-4 and result["ratio_tp2_over_tp1"] > 0
    assert [s["tp_rank"] for s in result["rank_stats"]] == [0, 1]


def test_tp_load_memory(tmp_path):
    result = _run("tp_load_memory.py", tmp_path / "load.json", "--folder", str(tmp_path / "ckpt"))
    assert set(result["runs"]) == {"transformers", "energon_hf", "energon_hf_presharded"}
    assert len(result["runs"]["energon_hf"]["ranks"]) == 2 and result["worst_rank_peak_rss_over_model"] > 0


def test_serve_vs_hf(tmp_path):
    """The real server as a subprocess at 1 and 4 clients, then transformers' static batch, on a tiny Llama."""
    result = _run("serve_vs_hf.py", tmp_path / "serve.json")
    assert set(result["server"]) == {"1", "4"}
    for clients, level in result["server"].items():
        assert level["clients"] == int(clients) and level["exact_lengths"] is True
        assert len(level["latencies_s"]) == level["requests"] and level["tokens_per_s"] > 0
    assert result["transformers"]["tokens_per_s"] > 0 and result["ratio"] > 0
    assert result["same_text"] is True and result["same_text_across_concurrency"] is True
