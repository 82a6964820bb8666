"""python -m energon_hf.convert: per-rank shards plus a manifest that from_pretrained loads directly."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import MIXED_LENGTHS, assert_forward_matches, assert_greedy_matches, padded_batch
from safetensors import safe_open

from energon_hf import CheckpointError, EnergonModel
from energon_hf.convert import convert


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_cli_writes_rank_shards_that_load_at_tp2_pp2(tiny, tmp_path):
    src = tiny.make("GPT2LMHeadModel", n_layer=3)
    out = tmp_path / "gpt2-tp2-pp2"
    done = subprocess.run([sys.executable, "-P", "-m", "energon_hf.convert", str(src), "--tp", "2", "--pp", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "energon_manifest.json").read_text())
    assert (manifest["tp"], manifest["pp"], manifest["architecture"]) == (2, 2, "GPT2LMHeadModel")
    stage0, stage1 = _keys(out / "rank-000.safetensors"), _keys(out / "rank-002.safetensors")
    assert any(k.startswith("transformer.h.1.") for k in stage0) and not any(".h.2." in k for k in stage0)
    assert any(k.startswith("transformer.h.2.") for k in stage1) and "transformer.wpe.weight" not in stage1
    hf = tiny.hf("GPT2LMHeadModel", n_layer=3)
    with EnergonModel.from_pretrained(out, threads_per_rank=1) as ours:  # tp and pp come from the manifest
        assert (ours.tp, ours.pp) == (2, 2)
        ids, mask = padded_batch(MIXED_LENGTHS[:4], 128, "left")
        assert_forward_matches(ours, hf, ids, mask)
        assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=8)


def test_single_rank_conversion_loads_in_process_and_half_precision(tiny, tmp_path):
    src = tiny.make("BertForMaskedLM")
    out = convert(src, tmp_path / "bert", dtype="float16")
    ours = EnergonModel.from_pretrained(out)
    assert ours.dtype == torch.float16 and ours.tp == 1
    ids, mask = padded_batch(MIXED_LENGTHS[:4], 100, "right")
    ours32 = EnergonModel.from_pretrained(out, dtype="float32")
    hf = tiny.hf("BertForMaskedLM").half().float()  # the same fp16-rounded weights
    assert_forward_matches(ours32, hf, ids, mask)


def test_mismatched_parallelism_and_bad_arguments_are_clear(tiny, tmp_path):
    out = convert(tiny.make("GPT2Model"), tmp_path / "tp2", tp=2)
    with pytest.raises(CheckpointError, match="converted for tp=2, pp=1"):
        EnergonModel.from_pretrained(out, tp=1)
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible by tp=3"):
        convert(tiny.make("GPT2Model"), tmp_path / "tp3", tp=3)
    with pytest.raises(ValueError, match="pp=3 needs at least 3 layers"):
        convert(tiny.make("GPT2Model"), tmp_path / "pp3", pp=3)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an energon_hf sharded folder"):
        convert(tiny.make("GPT2Model"), tmp_path / "busy")
