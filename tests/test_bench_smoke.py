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


def test_gpu_kernels_script(tmp_path):
    """The GPU check runs end to end on tiny sizes through the Triton interpreter: every kernel matched."""
    pytest.importorskip("triton")
    result = _run("gpu_kernels.py", tmp_path / "gpu.json")
    assert result["device"].startswith("cpu")
    assert {"remove_padding", "varlen_attention_equal", "paged_attention_decode", "rms_norm", "int4_decode_product",
            "int8_decode_product"} <= set(result["kernels"])
    assert all(figures.get("matched", True) for figures in result["kernels"].values())


def test_tp_load_memory(tmp_path):
    result = _run("tp_load_memory.py", tmp_path / "load.json", "--folder", str(tmp_path / "ckpt"))
    assert set(result["runs"]) == {"transformers", "energon_hf", "energon_hf_presharded"}
    assert len(result["runs"]["energon_hf"]["ranks"]) == 2 and result["worst_rank_peak_rss_over_model"] > 0


@pytest.mark.timeout(600)
def test_suite_quick(tmp_path):
    """bench/run.py --quick: the seven experiments (runtime, dynamic batching through three real servers, tp
    scaling, the generation server against transformers, generation per precision, quality per precision,
    encoders per precision) on tiny sizes, their JSON, plots and README table."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-P", str(BENCH / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=560)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    experiments = suite["experiments"]
    assert set(experiments) == {"runtime", "dynamic_batching", "tp_scaling", "generation", "decode", "quality",
                                "embeddings"}
    assert all(entry["exit"] == 0 for entry in experiments.values())

    runtime = experiments["runtime"]["result"]
    assert {(r["model"], r["batch"]) for r in runtime["runs"]} == {
        (m, b) for m in ("gpt2-tiny", "bert-tiny", "minilm") for b in (1, 4)}
    assert all(r["parity_ok"] and r["ratio"] > 0 and r["useful_flops"] > 0 for r in runtime["runs"])
    assert runtime["matmul_peak_flops_per_s"] > 0

    batching = experiments["dynamic_batching"]["result"]
    assert set(batching["servers"]) == {"fifo_padded", "energonai_padded", "energon_packed"}
    assert batching["same_embeddings"] is True
    assert all(level["requests"] == 24 and level["batches"] >= 1 for level in batching["servers"].values())

    tp = experiments["tp_scaling"]["result"]
    assert {(r["tp"], r["batch"]) for r in tp["runs"]} == {(1, 1), (1, 4), (2, 1), (2, 4)}
    assert all(r["max_abs_diff_vs_tp1"] < 1e-4 for r in tp["runs"])
    assert [len(r["ranks"]) for r in tp["runs"]] == [1, 1, 2, 2]

    generation = experiments["generation"]["result"]
    assert set(generation["server"]) == {"1", "4"}
    for clients, level in generation["server"].items():
        assert level["clients"] == int(clients) and level["exact_lengths"] is True
        assert len(level["latencies_s"]) == level["requests"] and level["tokens_per_s"] > 0
    assert generation["same_text"] is True and generation["same_text_across_concurrency"] is True

    decode = experiments["decode"]["result"]
    assert set(decode["runs"]) == {"1", "3"} and decode["read_bandwidth_bytes_per_s"] > 0
    sizes = decode["streamed_bytes_per_step"]
    assert sizes["int4"] < sizes["int8"] < sizes["bfloat16"] < sizes["float32"]
    for run in decode["runs"].values():
        assert run["float32_same_tokens_as_transformers"] is True
        assert set(run["variants"]) == {"float32", "bfloat16", "float16", "int8", "int4", "int4-exact"}
        assert all(v["new_tokens_per_s"] > 0 and 0 <= v["agreement_with_float32"] <= 1
                   for v in run["variants"].values())
    assert all(v["fraction_of_read_bandwidth"] > 0 for v in decode["runs"]["1"]["variants"].values())

    quality = experiments["quality"]["result"]
    assert set(quality["variants"]) == {"float32", "int8", "int4 (GGUF Q4_1 blocks)"}
    assert quality["variants"]["float32"]["greedy_agreement"] == quality["variants"]["float32"]["forced_agreement"] == 1
    assert all(abs(v["perplexity_vs_float32"]) < 0.05 for v in quality["variants"].values())

    embeddings = experiments["embeddings"]["result"]  # MiniLM int8 within issue 17's bounds (else exit 1)
    assert embeddings["passages"] == 306 and set(embeddings["variants"]) == {"int8"}
    int8 = embeddings["variants"]["int8"]
    assert 0.995 <= int8["worst_cosine"] < 1 and int8["top10_overlap"] >= 0.95 and int8["speed_vs_float32"] > 0

    for name in experiments:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The README table: generated from this JSON between the markers, the plots published next to it.
    sys.path.insert(0, str(BENCH))
    from report import END, START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\nold\n{END}\n\nafter\n")
    update_readme(suite, readme, sorted(out.glob("*.png")))
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n")
    assert f"| minilm | 4 | {runtime['runs'][-1]['padding_fraction']:.0%} |" in text
    assert f"**{batching['throughput_ratio_over_fifo']['energon_packed']:.2f}x**" in text
    assert f"**{generation['ratio']:.2f}x**" in text
    assert f"**{decode['runs']['1']['variants']['int4']['ratio_vs_transformers_float32']:.2f}x**" in text
    assert f"| int8 | {quality['variants']['int8']['perplexity']:.3f} |" in text
    assert f"| int8 | {int8['worst_cosine']:.5f} |" in text
    assert (tmp_path / "bench" / "published" / "cpu-quick" / "runtime.png").is_file()
    assert json.loads((tmp_path / "bench" / "published" / "cpu-quick" / "suite.json").read_text()) == suite


def test_serve_stall(tmp_path):
    """Two budgets on a tiny model: the stream and the long prompt both complete, and their figures are read."""
    result = _run("serve_stall.py", tmp_path / "stall.json")
    assert [run["budget"] for run in result["runs"]] == [16, 256]
    for run in result["runs"]:
        assert 1 < run["stream_chunks"] <= result["stream_tokens"]
        assert 0 < run["median_gap_s"] <= run["longest_gap_s"] and run["long_prompt_latency_s"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_attention(tmp_path, dtype):
    """The in-place decode kernel, the gathering torch path and transformers' padded layout agree (the script
    exits 1 otherwise) and are timed, on float32 and half-precision caches; without a compiler the script has
    nothing to compare."""
    from energon_hf.kernels import compiled

    if not compiled.available():
        pytest.skip("no C++ compiler: the compiled CPU ops cannot build here")
    result = _run("cpu_attention.py", tmp_path / "attention.json", "--dtype", dtype)
    assert result["args"]["dtype"] == dtype and [row["batch"] for row in result["rows"]] == [2, 5]
    assert all(row["in place ms"] > 0 and row["keys"] > 0 for row in result["rows"])


def test_a_partial_run_keeps_the_published_tables(tmp_path, monkeypatch):
    """bench/run.py --only X --readme: X's new entry replaces the published one, marked with this run's start, the
    published others stay (in the suite's order), and the README's header names the re-run table."""
    monkeypatch.syspath_prepend(str(BENCH))
    import report
    import run

    machine = dict(cpu_count=2, machine="x86_64", torch_threads=2, torch="t", transformers="t", loadavg_1_5_15=[0.5])
    published = {"mode": "cpu", "started": "base", "machine": machine,
                 "experiments": {"runtime": {"exit": 0, "old": 1}, "decode": {"exit": 0, "old": 2}}}
    (tmp_path / "suite.json").write_text(json.dumps(published))
    partial = {"mode": "cpu", "started": "later", "machine": machine, "experiments": {"decode": {"exit": 0, "new": 3}}}
    merged = run.merged_with_published(partial, tmp_path / "suite.json")
    assert merged["started"] == "base" and list(merged["experiments"]) == ["runtime", "decode"]
    assert merged["experiments"] == {"runtime": {"exit": 0, "old": 1},
                                     "decode": {"exit": 0, "new": 3, "rerun": "later"}}
    assert "Re-run alone later on the same machine (`bench/run.py --only ... --readme`): decode (later)." in \
        report.results_markdown(merged, ["bench/published/cpu/x.png"])
    assert run.merged_with_published(partial, tmp_path / "missing.json") is partial
