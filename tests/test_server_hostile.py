"""Hostile but fair requests against the real server (python -m energon_hf.serve on 127.0.0.1, real sockets):
each finding of the server-hardening probe, scaled down, answered 4xx (never 5xx, never plain text), with the
server healthy afterwards. Limits come from the command line, so the flags themselves are tested here."""

import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers
from PIL import Image
from test_server import start_server
from test_server_routes import ThreadedServer, hf_sentence_embeddings, random_picture, tiny_vit, wait_for

from energon_hf import EnergonModel
from energon_hf.kv_cache import available_memory
from energon_hf.serve import ServeSettings

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def gen(chat_llama):
    """A generation server on tp=2 with its limits and key given as flags; the last test stops it."""
    process, url = start_server("--model", str(chat_llama), "--served-name", "tiny", "--tp", "2",
                                "--kv-cache-tokens", "4096", "--max-body-bytes", str(BODY_LIMIT),
                                "--max-queue", "3", "--max-batch-tokens", "1024", "--shutdown-timeout", "2",
                                "--api-key", KEY, key=None)
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait(30)


@pytest.fixture(scope="module")
def enc(minilm_path):
    process, url = start_server("--model", str(minilm_path), "--served-name", "minilm", "--max-inputs", "64",
                                "--max-request-tokens", "2000", "--embed-batching", "priority",
                                "--max-wait-ms", "20", "--max-batch-tokens", "512", key=None)
    yield url
    process.terminate()
    process.wait(30)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=5).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


class HealthProbe:
    """Polls /health while a hostile request runs; `worst` is the slowest answer (an unanswered probe counts
    as its timeout)."""

    def __init__(self, url: str):
        self.url, self.worst, self.failures = url, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                ok = httpx.get(self.url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.worst = max(self.worst, time.monotonic() - start)
            self.failures += not ok
            time.sleep(0.05)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def raw_request(url: str, head: str, chunks, timeout: float = 5.0) -> tuple[int, dict]:
    """Send a request over a plain socket, body in `chunks` (stopping when the server stops reading), and
    return the status and JSON body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and stopped reading
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1] or b"{}")


def _length(answer: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", answer.split(b"\r\n\r\n", 1)[0], re.I)
    return int(found.group(1)) if found else 1 << 30


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error
    return error


# -- finding 1: a chunked body over the limit ---------------------------------------------------------------
def test_a_chunked_body_over_the_limit_is_refused_while_reading(gen):
    process, url = gen
    before = rss_bytes(process.pid)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * (1 << 16)
    sent = [0]

    def chunks():
        yield b'1a\r\n{"model":"tiny","prompt":"\r\n'
        for _ in range(50 * 16):  # 50 MB unless the server stops reading
            sent[0] += len(piece)
            yield b"%x\r\n%s\r\n" % (len(piece), piece)

    with HealthProbe(url) as probe:
        status, body = raw_request(url, head, chunks())
    assert status == 413 and "--max-body-bytes" in body["error"]["message"], body
    assert sent[0] < 20 << 20, "the server read far past its limit"
    assert probe.failures == 0 and probe.worst < 1.0
    assert rss_bytes(process.pid) - before < 200 << 20
    assert httpx.get(url + "/health").status_code == 200


# -- finding 4: lone surrogates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("route,body", [
    ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800 x"}'),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800 x"}]}'),
    ("/v1/pipeline", '{"inputs": "\\ud800 x"}'),
])
def test_a_lone_surrogate_is_a_400_that_names_the_field(gen, route, body):
    _, url = gen
    response = httpx.post(url + route, content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 400, "surrogate")


# -- findings 3 and 8: a client that goes away frees its sequence ------------------------------------------------
def _sequences_freed(url: str) -> bool:
    return metric(url, "energon_running_sequences") == 0 and metric(url, "energon_kv_cache_blocks_used") == 0


def test_a_non_streamed_request_whose_client_left_is_freed_within_two_seconds(gen):
    _, url = gen
    assert metric(url, "energon_kv_cache_blocks_total") == 4096 // 16
    body = json.dumps({"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True,
                       "temperature": 0}).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(lambda: metric(url, "energon_running_sequences") == 1)
    assert metric(url, "energon_kv_cache_blocks_used") > 0
    sock.close()
    wait_for(lambda: _sequences_freed(url), timeout=2.0)


def test_a_stream_whose_client_left_is_freed_within_two_seconds(gen):
    _, url = gen
    with httpx.stream("POST", url + "/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "prompt": [5, 6], "max_tokens": 2000, "ignore_eos": True,
                            "stream": True}) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    wait_for(lambda: _sequences_freed(url), timeout=2.0)


# -- finding 9: every error in OpenAI's error object ---------------------------------------------------------------
def test_framework_errors_use_the_openai_error_object(gen):
    _, url = gen
    assert_error(httpx.get(url + "/v1/nothing", headers=AUTH), 404, "/v1/nothing")
    assert_error(httpx.get(url + "/v1/completions", headers=AUTH), 405, "GET")
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=AUTH), 400, "model")
    assert_error(httpx.post(url + "/v1/completions", content=b"{", headers={**AUTH, "Content-Type":
                                                                            "application/json"}), 400, "JSON")
    assert_error(httpx.post(url + "/v1/completions", json={"model": "other", "prompt": "x"}, headers=AUTH), 404,
                 "other")


# -- finding 11: a seed out of range names the seed ----------------------------------------------------------------
def test_a_seed_out_of_range_is_a_400_that_names_the_seed(gen):
    _, url = gen
    response = httpx.post(url + "/v1/completions", headers=AUTH,
                          json={"model": "tiny", "prompt": "hi", "seed": 2 ** 64, "max_tokens": 2})
    assert assert_error(response, 400)["param"] == "seed"
    top = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "hi", "n": 2,
                                                                    "seed": 2 ** 53 - 1, "max_tokens": 2})
    assert top.status_code == 200, top.text


# -- finding 13: the Bearer scheme, case-insensitive and required -----------------------------------------------
def test_the_api_key_flag_needs_the_bearer_scheme_in_any_case(gen):
    _, url = gen
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": KEY}), 401, "API key")
    assert_error(httpx.get(url + "/v1/models"), 401)
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # no key needed


# -- finding 6: nothing of the engine listens beyond loopback ---------------------------------------------------
def listening_addresses(pid: int) -> list[str]:
    """The local addresses of the TCP sockets in LISTEN state that process `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.append(fields[1].split(":")[0])
    return found


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_the_server_and_its_engine_listen_on_loopback_only(gen):
    process, _ = gen
    workers = children(process.pid)
    assert len(workers) == 2
    addresses = [a for pid in (process.pid, *workers) for a in listening_addresses(pid)]
    assert addresses and set(addresses) <= LOOPBACK, addresses


# -- --max-queue from the command line -----------------------------------------------------------------------
def test_the_max_queue_flag_refuses_more_choices_than_it_allows(gen):
    _, url = gen
    response = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "hi", "n": 4})
    assert assert_error(response, 429, "queue is full", "3")["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "1"


# -- finding 14 (runs last on this server): SIGTERM drains for --shutdown-timeout, then ends the rest -------------
def test_sigterm_ends_streams_after_the_drain_time_and_no_worker_survives(gen):
    process, url = gen
    workers = children(process.pid)
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", headers=AUTH, timeout=60,
                          json={"model": "tiny", "prompt": [5], "max_tokens": 2000, "ignore_eos": True,
                                "stream": True}) as response:
            for line in response.iter_lines():
                lines.append(line)
                started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    begin = time.monotonic()
    process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert not thread.is_alive()
    assert process.wait(30) in (0, -signal.SIGTERM) and time.monotonic() - begin < 15  # uvicorn re-raises it
    assert any('"error"' in line and "shutting down" in line for line in lines), lines[-3:]
    assert "data: [DONE]" not in lines
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()


# -- finding 2, 10 and the embeddings flags ----------------------------------------------------------------------
def test_many_inputs_are_refused_before_tokenizing_and_health_stays_fast(enc):
    with HealthProbe(enc) as probe:
        many = httpx.post(enc + "/v1/embeddings", json={"model": "minilm", "input": ["a b"] * 5000}, timeout=30)
        long = httpx.post(enc + "/v1/embeddings", json={"model": "minilm", "input": ["word " * 100] * 30},
                          timeout=30)
    assert assert_error(many, 400, "5000", "--max-inputs")["code"] == "too_many_inputs"
    assert assert_error(long, 400, "--max-request-tokens")["code"] == "too_many_tokens"
    assert probe.failures == 0 and probe.worst < 1.0


def test_a_lone_surrogate_in_embeddings_is_a_400(enc):
    response = httpx.post(enc + "/v1/embeddings", content='{"model": "minilm", "input": ["ok", "\\udfff"]}',
                          headers={"Content-Type": "application/json"})
    assert "input[1]" in assert_error(response, 400, "surrogate")["message"]


def test_the_openai_sdk_defaults_to_base64_embeddings_and_gets_them(enc, minilm_path):
    texts = ["A man is eating food.", "A cheetah chases prey."]
    client = openai.OpenAI(base_url=enc + "/v1", api_key="unused")
    got = torch.tensor([d.embedding for d in client.embeddings.create(model="minilm", input=texts).data])
    expected = hf_sentence_embeddings(minilm_path, texts)
    assert (got - expected).abs().max() < 1e-4
    raw = httpx.post(enc + "/v1/embeddings", json={"model": "minilm", "input": texts[0],
                                                    "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(raw), dtype="<f4"), expected[0].numpy(), atol=1e-4)


def test_normalize_false_returns_the_mean_pooled_vectors(enc, minilm_path):
    texts = ["A man is eating food."]
    raw = httpx.post(enc + "/v1/embeddings", json={"model": "minilm", "input": texts, "normalize": False}).json()
    got = torch.tensor(raw["data"][0]["embedding"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    with torch.no_grad():
        hidden = transformers.AutoModel.from_pretrained(minilm_path)(**tokenizer(texts, return_tensors="pt"))[0]
    assert (got - hidden[0].mean(0)).abs().max() < 1e-4 and abs(got.norm() - 1) > 1e-2


# -- finding 5: images are bounded before they are decoded ----------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_images_over_the_limits_are_refused_unread(tmp_path):
    tiny_vit(tmp_path, "ViTForImageClassification")

    def encoded(image_bytes: bytes) -> str:
        return base64.b64encode(image_bytes).decode()

    def png(width: int, height: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(out, format="PNG")
        return out.getvalue()

    settings = ServeSettings("vit", max_image_pixels=300 * 300, max_image_bytes=50_000)
    with ThreadedServer(EnergonModel.from_pretrained(tmp_path), None, settings) as server:
        url = server.url + "/v1/pipeline"
        bomb = png_header_only(50000, 50000)
        assert len(bomb) < 100
        assert_error(httpx.post(url, json={"inputs": encoded(bomb)}), 400, "2500000000", "--max-image-pixels")
        assert_error(httpx.post(url, json={"inputs": encoded(png(400, 400))}), 400, "--max-image-pixels")
        _, noise = random_picture(150, 150, seed=0)  # about 67 kB: noise does not compress
        assert_error(httpx.post(url, json={"inputs": encoded(noise)}), 400, "--max-image-bytes")
        fine = httpx.post(url, json={"inputs": encoded(png(200, 100))}, timeout=30)
        assert fine.status_code == 200 and len(fine.json()) > 0
        assert httpx.get(server.url + "/health").status_code == 200


# -- finding 7: a worker that dies while the engine is idle ----------------------------------------------------
def test_health_turns_503_within_a_second_of_an_idle_workers_death(chat_llama):
    model = EnergonModel.from_pretrained(chat_llama, tp=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    with ThreadedServer(model, tokenizer, ServeSettings("tiny")) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        os.kill(model.runner.pids[0], signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: httpx.get(server.url + "/health").status_code == 503, timeout=1.0)
        assert time.monotonic() - killed < 1.0
        late = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 2})
        assert_error(late, 503, "died")


# -- finding 12: a model the tp size does not fit is a one-line error -------------------------------------------
def test_a_tp_that_does_not_divide_the_heads_is_a_short_error(chat_llama):
    result = subprocess.run([sys.executable, "-P", "-m", "energon_hf.serve", "--model", str(chat_llama), "--tp", "3",
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 3 and lines[-1].startswith("error:") and "3" in lines[-1], result.stderr[-2000:]


# -- the served OpenAPI schema: a schema-driven fuzzer with all its checks finds nothing ------------------------
def schemathesis(url: str, *headers: str, cwd) -> subprocess.CompletedProcess:
    """schemathesis with every check, a fixed seed and one worker (two threads hit CPython 3.11.7's "AST
    constructor recursion depth mismatch" inside hypothesis, an error of the tool, not of the server)."""
    command = [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", url + "/openapi.json",
               "--checks", "all", "--max-examples", "10", "--seed", "1", "--workers", "1", "--no-color",
               "--request-timeout", "60", "--max-response-time", "60", "--generation-database", "none"]
    for header in headers:
        command += ["-H", header]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)  # it writes a cache


def test_schemathesis_with_all_checks_finds_nothing_on_a_generation_server(chat_llama_short, tmp_path):
    process, url = start_server("--model", str(chat_llama_short), "--served-name", "tiny", "--api-key", KEY,
                                "--kv-cache-memory-fraction", "0.0001", key=None)
    try:
        # the cache took its share of the memory left: 0.01 % of it, at 2 x 2 layers x 2 heads x 16 x 4 bytes
        line = next(line for line in process.output if line.startswith("serving "))
        tokens = int(re.search(r"KV cache of (\d+) tokens", line).group(1))
        assert "steps of at most 512 tokens" in line  # the generation default of --max-batch-tokens
        expected = 0.0001 * available_memory(torch.device("cpu")) / 512
        assert abs(tokens - expected) <= 0.2 * expected + 16, line
        schema = httpx.get(url + "/openapi.json").json()  # public, as the docs
        assert schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == ["tiny"]
        assert "/v1/embeddings" not in schema["paths"]  # a generation server: the route only says what to use
        result = schemathesis(url, f"Authorization: Bearer {KEY}", cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-6000:]
    finally:
        process.terminate()
        process.wait(30)


def test_schemathesis_with_all_checks_finds_nothing_on_an_embedding_server(enc, tmp_path):
    result = schemathesis(enc, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
