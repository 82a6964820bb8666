"""Two torchrun launches as two nodes on 127.0.0.1, one rank each, driven by this process: the engine
spans 'machines' exactly as it spans local processes."""

import socket
import subprocess
import sys

import httpx
import pytest
import torch
from helpers import MIXED_LENGTHS, assert_forward_matches, assert_greedy_matches, padded_batch
from test_server import AUTH, start_server
from transformers import AutoTokenizer

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


def test_the_server_serves_ranks_on_two_torchrun_nodes(chat_llama, tmp_path, monkeypatch):
    """python -m energon_hf.serve --driver-address: the same ranks, behind the OpenAI routes."""
    monkeypatch.setenv(ENGINE_KEY_ENV, "test-secret")
    path = chat_llama
    driver = f"127.0.0.1:{free_port()}"
    master_port = free_port()
    nodes = [torchrun_node(n, master_port, driver, tmp_path) for n in range(2)]
    server = None
    try:
        server, url = start_server("--model", str(path), "--served-name", "tiny", "--tp", "2",
                                   "--driver-address", driver)
        prompt = [5, 17, 99, 3]
        body = httpx.post(url + "/v1/completions", headers=AUTH, timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}).json()
        with EnergonModel.from_pretrained(path) as local:
            expected = local.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, len(prompt):]
        assert body["usage"]["completion_tokens"] == 6
        assert "tp=2" in "".join(server.output)
        assert body["choices"][0]["text"] == AutoTokenizer.from_pretrained(path).decode(expected,
                                                                                        skip_special_tokens=True)
        server.terminate()
        assert server.wait(60) == 0 or server.returncode < 0
        for node in nodes:  # the server's engine closed: its workers end, and torchrun with them
            assert node.wait(60) == 0, node.stdout.read()[-3000:]
    finally:
        for process in [*nodes, server]:
            if process is not None and process.poll() is None:
                process.kill()


def test_remote_workers_need_a_shared_key(tiny, monkeypatch):
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=ENGINE_KEY_ENV):
        EnergonModel.from_pretrained(tiny.make("GPT2Model"), tp=2, driver_address="127.0.0.1:1")
