"""The README's examples marked `<!-- readme-example: NAME -->` run as written."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_server import start_server

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = dict(re.findall(r"<!-- readme-example: (\S+) -->\s*```(?:python|bash)\n(.*?)```", README.read_text(),
                           re.S))
SERVER_PORT = "127.0.0.1:8020"


def test_examples_are_found():
    assert {"pipelines", "server-curl", "server-openai"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if not n.startswith("server-")))
def test_readme_example_runs(name, tmp_path):
    script = tmp_path / f"{name}.py"
    script.write_text(EXAMPLES[name])
    done = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    if name == "pipelines":
        assert "Paris" in done.stdout and "2 8 384" in done.stdout
    if name == "sentence-transformer":
        assert "(3, 384)" in done.stdout and "same as sentence-transformers: True" in done.stdout


def test_readme_main_command_serves_the_curl_and_openai_examples(tmp_path):
    """The server as `make run` starts it (the embedded SmolLM2, no API key), on a free port instead of 8020;
    the README's curl commands and openai-client script run against it as written."""
    process, url = start_server(key=None, timeout=300)
    try:
        address = url.removeprefix("http://")
        curls = [line.replace(SERVER_PORT, address) for line in EXAMPLES["server-curl"].splitlines()
                 if line.startswith("curl ")]
        outputs = [subprocess.run(["bash", "-c", c], capture_output=True, text=True, timeout=300).stdout
                   for c in curls]
        chat, stream, pipe = outputs
        assert json.loads(chat)["choices"][0]["message"]["content"] == "The capital of France is Paris."
        assert stream.strip().endswith("data: [DONE]") and stream.count("data: ") > 3
        assert json.loads(pipe)[0]["generated_text"].startswith("The capital of France is")
        script = tmp_path / "client.py"
        script.write_text(EXAMPLES["server-openai"].replace(SERVER_PORT, address))
        done = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.splitlines() == ["The capital of France is Paris."] * 2
    finally:
        process.terminate()
        process.wait(30)
