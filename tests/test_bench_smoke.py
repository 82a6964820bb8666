"""The benchmark code runs (tiny sizes) so it cannot rot. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bert_packed_vs_hf_quick(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-P", str(REPO / "bench" / "bert_packed_vs_hf.py"), "--quick", "--repeats", "1",
           "--warmup", "0", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["max_abs_diff_ok"] is True
    assert set(result["real_tokens_per_s"]) == {"hf_sdpa_padded", "energon_packed"}
    assert result["ratio_energon_over_hf"] > 0
