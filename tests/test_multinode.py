"""Two torchrun launches as two nodes on 127.0.0.1, one rank each, driven by this process: the engine
spans 'machines' exactly as it spans local processes."""

import socket
import subprocess
import sys

import pytest
from helpers import MIXED_LENGTHS, assert_forward_matches, assert_greedy_matches, padded_batch

from energon_hf import EnergonModel
from energon_hf.engine.multiprocess import ENGINE_KEY_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_node(node_rank: int, master_port: int, driver: str, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(master_port),
         "-m", "energon_hf.node", "--driver", driver, "--connect-timeout", "120"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_torchrun_nodes_serve_one_tp2_model(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(ENGINE_KEY_ENV, "test-secret")
    path, hf = tiny.make("GPT2LMHeadModel"), tiny.hf("GPT2LMHeadModel")
    driver = f"127.0.0.1:{free_port()}"
    master_port = free_port()
    nodes = [torchrun_node(n, master_port, driver, tmp_path) for n in range(2)]
    try:
        with EnergonModel.from_pretrained(path, tp=2, driver_address=driver) as ours:
            assert [s["tp_rank"] for s in ours.runner.rank_stats()] == [0, 1]
            ids, mask = padded_batch(MIXED_LENGTHS[:4], 128, "left")
            assert_forward_matches(ours, hf, ids, mask)
            assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=8)
        for node in nodes:  # closing the engine ends the workers, and torchrun with them
            assert node.wait(60) == 0, node.stdout.read()[-3000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()


def test_remote_workers_need_a_shared_key(tiny, monkeypatch):
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=ENGINE_KEY_ENV):
        EnergonModel.from_pretrained(tiny.make("GPT2Model"), tp=2, driver_address="127.0.0.1:1")
