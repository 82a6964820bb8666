"""EnergonAI-style config files (`python -m energon_hf.serve --config FILE`): a checkpoint served with the
file's settings, a custom model_class built from Linear1D_Col / Linear1D_Row launched on 2 ranks, and
clear errors for bad files."""

import re
import subprocess
import sys
import textwrap

import httpx
import pytest
import torch
from test_server import AUTH, start_server

from energon_hf.serve.__main__ import parse_args, resolve
from energon_hf.serve.config import ConfigError, read_config

CUSTOM = '''
import torch
from torch import nn

from energon_hf import Linear1D_Col, Linear1D_Row


def weights():
    gen = torch.Generator().manual_seed(0)
    return {"fc1.weight": torch.randn(32, 8, generator=gen), "fc1.bias": torch.randn(32, generator=gen),
            "fc2.weight": torch.randn(8, 32, generator=gen) / 6, "fc2.bias": torch.randn(8, generator=gen)}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = Linear1D_Col(8, 32, activation="gelu")
        self.fc2 = Linear1D_Row(32, 8)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def build_mlp():
    model = MLP()
    for name, tensor in weights().items():
        module, param = name.split(".")
        getattr(model, module).load_full_(param, tensor)
    return model


model_class = build_mlp
model_type = "mlp"
tp_init_size = 2
pp_init_size = 1
backend = "gloo"
half = False
host = "127.0.0.1"
port = 29400
server_host = "127.0.0.1"
server_port = 8020
rm_padding = True
'''


def test_custom_model_class_from_parallel_layers_serves_its_forward(tmp_path):
    (tmp_path / "mlp_config.py").write_text(CUSTOM)
    process, url = start_server("--config", str(tmp_path / "mlp_config.py"))  # --port overrides server_port
    try:
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
        body = httpx.post(url + "/v1/pipeline", json={"inputs": x.tolist()}, headers=AUTH, timeout=60)
        assert body.status_code == 200, body.text
        sys.path.insert(0, str(tmp_path))
        try:
            import mlp_config
        finally:
            sys.path.remove(str(tmp_path))
        w = mlp_config.weights()
        expected = torch.nn.functional.gelu(x @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T + w["fc2.bias"]
        assert (torch.tensor(body.json()) - expected).abs().max() < 1e-5
        serving = next(line for line in process.output if line.startswith("serving"))  # printed before listening
        assert "tp=2, pp=1" in serving  # tp_init_size = 2
        models = httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]
        assert models["id"] == "build_mlp" and models["task"] == "mlp"
        wrong = httpx.post(url + "/v1/pipeline", json={"inputs": [[1.0, 2.0]]}, headers=AUTH, timeout=60)
        assert wrong.status_code == 400 and "rejected" in wrong.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200  # a bad input leaves the engine up
    finally:
        process.terminate()
        process.wait(30)


def test_a_checkpoint_config_maps_energonai_keys_and_flags_win(tmp_path):
    (tmp_path / "gpt_config.py").write_text(textwrap.dedent("""
        model_class = "path/to/checkpoint"
        model_type = "gpt"
        half = True
        backend = "gloo"
        tp_init_size = 2
        pp_init_size = 2
        server_host = "0.0.0.0"
        server_port = 8123
        host = "127.0.0.1"
        port = 29400
        rm_padding = False
    """))
    config = str(tmp_path / "gpt_config.py")
    setup = resolve(parse_args(["--config", config]))
    assert setup == {"model": "path/to/checkpoint", "tp": 2, "pp": 2, "dtype": "float16", "device": "cpu",
                     "host": "0.0.0.0", "port": 8123, "factory": None, "task": "gpt", "quantization": None}
    flags = resolve(parse_args(["--config", config, "--tp", "1", "--port", "9000", "--dtype", "float32",
                                "--quantization", "int8"]))
    assert (flags["tp"], flags["port"], flags["dtype"], flags["pp"], flags["quantization"]) == \
        (1, 9000, "float32", 2, "int8")


def test_the_embedded_model_computes_on_its_4_bit_weights_unless_told_otherwise():
    assert resolve(parse_args([]))["quantization"] == "int4"
    assert resolve(parse_args(["--quantization", "none"]))["quantization"] == "none"
    assert resolve(parse_args(["--model", "some/checkpoint"]))["quantization"] is None


def test_bad_config_files_are_clear_errors(tmp_path):
    cases = {"unknown_keys.py": ("model_class = 'x'\ntp_size = 2\n", "unknown keys ['tp_size']"),
             "bad_backend.py": ("backend = 'mpi'\n", "backend must be one of"),
             "bad_import.py": ("import does_not_exist\n", "failed to run: ModuleNotFoundError"),
             "bad_tp.py": ("tp_init_size = 0\n", "tp_init_size must be a positive integer")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            read_config(tmp_path / name)
    done = subprocess.run([sys.executable, "-P", "-m", "energon_hf.serve", "--config", str(tmp_path / "bad_tp.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "tp_init_size must be a positive integer" in done.stderr
