"""More of the server, each on a real uvicorn server on 127.0.0.1 in a thread of the test process (one
interpreter start fewer per server): a full queue's 429, an engine worker killed under load, /v1/pipeline for
encoder and image tasks, and /v1/embeddings' dynamic batching."""

import base64
import io
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import transformers
import uvicorn
from PIL import Image

from energon_hf import EnergonModel, SentenceTransformer
from energon_hf.engine.dynamic_batcher import DynamicBatcher, EncodeRequest, pick_priority
from energon_hf.kv_cache import BLOCK_SIZE, available_memory, bytes_per_token
from energon_hf.serve import ServeSettings, create_app
from energon_hf.serve.app import MAX_RUNNING, kv_cache_tokens
from energon_hf.serve.state import ENCODER_BATCH_TOKENS, GENERATION_STEP_TOKENS


class ThreadedServer:
    """create_app served by uvicorn on a free 127.0.0.1 port, in a thread."""

    def __init__(self, model: EnergonModel, tokenizer, settings: ServeSettings):
        self.app = create_app(model, tokenizer, settings)
        self.served = self.app.state.served
        # port 0: the server takes a free port itself (no two tests can race for one); `url` is set on entry
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.served.close()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def completion(prompt: list[int], new: int, **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, **extra}


def test_a_full_queue_answers_429_with_retry_after(chat_llama):
    """The KV cache (512 tokens) holds one long sequence; a prompt that needs the whole cache waits for it;
    with --max-queue 1 the next request is refused at once, and the waiting one is served later."""
    model = EnergonModel.from_pretrained(chat_llama)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    with ThreadedServer(model, tokenizer, ServeSettings("tiny", max_queue=1, kv_cache_tokens=512)) as server:
        url = server.url + "/v1/completions"
        waiting: list[httpx.Response] = []
        with httpx.stream("POST", url, json=completion([5] * 10, 500, stream=True), timeout=120) as first:
            # Keep the line iterator: a closed one closes the response, and the server would cancel the stream.
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it is running
            thread = threading.Thread(target=lambda: waiting.append(httpx.post(url, json=completion([6] * 500, 1),
                                                                               timeout=120)))
            thread.start()
            wait_for(lambda: len(server.served.batcher.waiting) == 1)
            refused = httpx.post(url, json=completion([7] * 5, 1), timeout=30)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
        thread.join(60)  # the stream was closed: its sequence left and the waiting request ran
        assert waiting[0].status_code == 200 and waiting[0].json()["usage"]["completion_tokens"] == 1


def test_the_kv_cache_is_sized_from_the_memory_left(chat_llama):
    """Without kv_cache_tokens: its memory fraction of what the device has free, in whole blocks, at most what
    the running sequences could ever use (MAX_RUNNING x the context)."""
    model = EnergonModel.from_pretrained(chat_llama)
    per_token = bytes_per_token(*model.model.kv_cache_layout(), model.dtype)
    expected = 0.001 * available_memory(model.device) / per_token
    tokens = kv_cache_tokens(model, ServeSettings("tiny", kv_cache_memory_fraction=0.001))
    assert tokens % BLOCK_SIZE == 0 and abs(tokens - expected) <= 0.1 * expected + BLOCK_SIZE
    whole = kv_cache_tokens(model, ServeSettings("tiny", kv_cache_memory_fraction=1.0))
    assert whole == MAX_RUNNING * model.config.max_position_embeddings < available_memory(model.device) / per_token
    assert kv_cache_tokens(model, ServeSettings("tiny", kv_cache_tokens=512)) == 512  # given: as given
    with pytest.raises(ValueError, match="memory fraction must be in"):
        kv_cache_tokens(model, ServeSettings("tiny", kv_cache_memory_fraction=1.5))


def test_the_step_budget_defaults_to_what_is_served(chat_llama, minilm_path):
    """Without max_batch_tokens, a generation step holds GENERATION_STEP_TOKENS (a 700-token prompt runs as a
    512-token chunk, then the rest) and an encoder batch ENCODER_BATCH_TOKENS."""
    model = EnergonModel.from_pretrained(chat_llama)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    with ThreadedServer(model, tokenizer, ServeSettings("tiny", kv_cache_tokens=2048)) as server:
        steps, count = [], server.served.batcher.on_step
        server.served.batcher.on_step = lambda kind, sequences: (steps.append(kind), count(kind, sequences))
        response = httpx.post(server.url + "/v1/completions", json=completion(list(range(100, 800)), 2), timeout=60)
        assert response.status_code == 200, response.text
    assert GENERATION_STEP_TOKENS == 512 and steps == ["mixed", "mixed", "decode"]
    encoder = create_app(EnergonModel.from_pretrained(minilm_path), transformers.AutoTokenizer.from_pretrained(
        minilm_path), ServeSettings("minilm")).state.served
    try:
        assert encoder.encoder.max_batch_tokens == ENCODER_BATCH_TOKENS == 4096
    finally:
        encoder.close()


def test_a_full_cache_preempts_and_the_metrics_count_it(chat_llama):
    """A cache of 4 blocks of 16 tokens: two choices of one request (admitted together) that grow to 3 blocks
    each cannot both stay; the newest is preempted and recomputed, both answers are whole and equal (greedy),
    and /metrics counts the preemption."""
    model = EnergonModel.from_pretrained(chat_llama)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    with ThreadedServer(model, tokenizer, ServeSettings("tiny", kv_cache_tokens=64)) as server:
        answer = httpx.post(server.url + "/v1/completions", json=completion([5] * 10, 30, n=2), timeout=120).json()
        assert answer["usage"]["completion_tokens"] == 60
        assert answer["choices"][0]["text"] == answer["choices"][1]["text"]
        preemptions = server.served.batcher.preemptions
        assert preemptions >= 1
        assert f"energon_preemptions_total {float(preemptions)}" in httpx.get(server.url + "/metrics").text


def test_a_killed_worker_fails_requests_with_503_and_the_server_turns_unhealthy(chat_llama):
    """Documented behaviour: requests in flight and later ones get 503 engine_error (a stream gets an error
    event), /health answers 503 so an orchestrator restarts the server; HTTP itself stays up."""
    model = EnergonModel.from_pretrained(chat_llama, tp=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    with ThreadedServer(model, tokenizer, ServeSettings("tiny")) as server:
        url = server.url + "/v1/completions"
        answers: list[httpx.Response] = []
        streamed: list[str] = []

        def ask(i: int) -> None:
            answers.append(httpx.post(url, json=completion([5 + i] * (4 + i), 1000), timeout=120))

        def stream() -> None:
            with httpx.stream("POST", url, json=completion([9] * 6, 1000, stream=True), timeout=120) as response:
                streamed.extend(response.iter_lines())

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)] + [threading.Thread(target=stream)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(server.served.batcher.running) >= 4)
        os.kill(model.runner.pids[1], signal.SIGKILL)
        for thread in threads:
            thread.join(60)
        assert len(answers) == 6 and all(a.status_code == 503 for a in answers), [a.text for a in answers]
        assert all(a.json()["error"]["type"] == "engine_error" for a in answers)
        assert any('"engine_error"' in line for line in streamed) and "data: [DONE]" not in streamed
        assert httpx.get(server.url + "/health").status_code == 503
        assert httpx.get(server.url + "/v1/models").status_code == 200
        late = httpx.post(url, json=completion([5], 2), timeout=30)
        assert late.status_code == 503 and "engine" in late.json()["error"]["message"]


@pytest.fixture(scope="module")
def minilm_server(minilm_path):
    model = EnergonModel.from_pretrained(minilm_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    with ThreadedServer(model, tokenizer, ServeSettings("minilm", max_batch_tokens=512)) as server:
        yield server


def hf_sentence_embeddings(folder, texts: list[str]) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_concurrent_embedding_requests_each_equal_transformers(minilm_server, minilm_path):
    words = "the quick brown fox jumps over a lazy dog while energon packs every token".split()
    gen = np.random.default_rng(0)
    requests = [[" ".join(gen.choice(words, int(gen.integers(1, 40)))) for _ in range(int(gen.integers(1, 4)))]
                for _ in range(24)]
    answers: list = [None] * len(requests)

    def ask(i: int) -> None:
        answers[i] = httpx.post(minilm_server.url + "/v1/embeddings", json={"model": "minilm", "input": requests[i]},
                                timeout=120).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    expected = hf_sentence_embeddings(minilm_path, [t for texts in requests for t in texts])
    got = torch.tensor([d["embedding"] for answer in answers for d in answer["data"]])
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4


def test_pipeline_route_feature_extraction_equals_transformers(minilm_server, minilm_path):
    texts = ["A man is eating food.", "A man is riding a horse."]
    body = httpx.post(minilm_server.url + "/v1/pipeline", json={"inputs": texts}, timeout=60).json()
    expected = transformers.pipeline("feature-extraction", model=str(minilm_path), dtype=torch.float32)(texts)
    for ours, theirs in zip(body, expected, strict=True):
        assert np.abs(np.array(ours) - np.array(theirs)).max() < 1e-4
    bad = httpx.post(minilm_server.url + "/v1/pipeline", json={"inputs": texts, "parameters": {"device": 0}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "parameters"
    assert httpx.post(minilm_server.url + "/v1/pipeline", json={"inputs": [1, 2]}).status_code == 400


def tiny_vit(folder, arch: str, **config) -> None:
    """A tiny random ViT of class `arch` (32 x 32 images) with its image processor, saved to `folder`."""
    torch.manual_seed(0)
    model_config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=96, **config)
    getattr(transformers, arch)(model_config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def random_picture(height: int, width: int, seed: int) -> tuple[Image.Image, bytes]:
    """A random RGB picture and its PNG bytes."""
    picture = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))
    png = io.BytesIO()
    picture.save(png, format="PNG")
    return picture, png.getvalue()


def test_pipeline_route_images_come_as_base64_never_as_paths_or_urls(tmp_path):
    tiny_vit(tmp_path, "ViTForImageClassification", id2label={0: "cat", 1: "dog", 2: "bird"},
             label2id={"cat": 0, "dog": 1, "bird": 2})
    picture, png = random_picture(40, 30, seed=0)
    encoded = base64.b64encode(png).decode()
    with ThreadedServer(EnergonModel.from_pretrained(tmp_path), None, ServeSettings("vit")) as server:
        url = server.url + "/v1/pipeline"
        ours = httpx.post(url, json={"inputs": [encoded, "data:image/png;base64," + encoded],
                                     "parameters": {"top_k": 2}}, timeout=60).json()
        theirs = transformers.pipeline("image-classification", model=str(tmp_path))(picture, top_k=2)
        for answer in ours:
            assert [d["label"] for d in answer] == [d["label"] for d in theirs]
            assert max(abs(a["score"] - b["score"]) for a, b in zip(answer, theirs, strict=True)) < 1e-4
        for refused in (str(tmp_path / "model.safetensors"), "http://127.0.0.1:1/cat.png", "bm90IGFuIGltYWdl"):
            response = httpx.post(url, json={"inputs": refused}, timeout=30)
            assert response.status_code == 400 and "base64" in response.json()["error"]["message"]


def test_dynamic_batching_runs_requests_that_waited_together(minilm_path):
    """While a batch runs, the next requests queue up; they then run as one batch (packed policy) whose
    results are each request's own."""
    model = EnergonModel.from_pretrained(minilm_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    embed = SentenceTransformer(model).embed_sequences
    gate, batches = threading.Event(), []

    def run(sequences):
        gate.wait(30)  # holds the first batch so that the others queue behind it
        batches.append(len(sequences))
        return embed(sequences)

    batcher = DynamicBatcher(run, max_batch_tokens=4096)
    try:
        texts = [["A man is eating food."], ["A cat.", "Tensor parallelism splits weights."], ["Paris is in France."]]
        first = batcher.submit(tokenizer(["The first request."])["input_ids"])
        wait_for(lambda: batcher.running)
        futures = [batcher.submit(tokenizer(t)["input_ids"]) for t in texts]
        gate.set()
        first.result(30)
        results = [f.result(30) for f in futures]
    finally:
        batcher.close()
    assert batches == [1, 4]  # the three waiting requests (four texts) ran together
    expected = hf_sentence_embeddings(minilm_path, [t for group in texts for t in group])
    got = torch.stack([torch.nn.functional.normalize(v, dim=-1) for r in results for v in r])
    assert (got - expected).abs().max() < 1e-4


def test_priority_policy_groups_by_length_and_never_starves():
    """EnergonAI's policy: length-sorted groups with the least padding; the biggest group first, unless a
    request waited past max_wait, whose group then goes first."""
    ran: list[list[int]] = []
    gate = threading.Event()

    def run(sequences):
        gate.wait(30)
        ran.append(sorted(len(s) for s in sequences))
        return [len(s) for s in sequences]

    batcher = DynamicBatcher(run, max_batch_tokens=1024, policy="priority", max_wait_s=60)
    try:
        hold = batcher.submit([[1]])
        wait_for(lambda: batcher.running)
        lengths = [100, 5, 101, 6, 7, 102, 5]
        futures = [batcher.submit([[1] * n]) for n in lengths]
        gate.set()
        assert [f.result(30) for f in futures] == [[n] for n in lengths] and hold.result(30) == [1]
    finally:
        batcher.close()
    assert ran == [[1], [5, 5, 6, 7], [100, 101, 102]]



def test_priority_policy_runs_a_request_that_waited_past_max_wait_first():
    now = 100.0
    short = [EncodeRequest([[1] * 5], arrived=now - 0.01) for _ in range(6)]
    long = EncodeRequest([[1] * 200], arrived=now - 0.01)
    assert pick_priority([long, *short], now, 4096, max_wait_s=1.0) == short  # the bigger group
    long.arrived = now - 1.0  # waited max_wait: its group goes first, however small
    assert pick_priority([long, *short], now, 4096, max_wait_s=1.0) == [long]


def tiny_bert_head(folder, minilm_path, arch: str):
    """A tiny random BERT of class `arch` with MiniLM's tokenizer (vocabulary 30522) and three labels."""
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128,
                                     id2label={0: "O", 1: "B-X", 2: "I-X"}, label2id={"O": 0, "B-X": 1, "I-X": 2})
    torch.manual_seed(0)
    getattr(transformers, arch)(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (folder / name).write_bytes((minilm_path / name).read_bytes())
    return folder


def close_results(ours, theirs) -> None:
    """Pipeline outputs equal in structure, labels and tokens, and in scores within 1e-4."""
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs)
        for key in theirs:
            close_results(ours[key], theirs[key])
    elif isinstance(theirs, list | tuple):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            close_results(a, b)
    elif isinstance(theirs, float | np.floating):
        assert abs(ours - float(theirs)) < 1e-4
    elif isinstance(theirs, np.ndarray | torch.Tensor):
        close_results(ours, np.asarray(theirs).tolist())
    else:
        assert ours == (theirs.item() if hasattr(theirs, "item") else theirs)


@pytest.mark.parametrize("arch,task,inputs,parameters", [
    ("BertForMaskedLM", "fill-mask", ["Paris is the [MASK] of France.", "A [MASK] day."], {"top_k": 3}),
    ("BertForSequenceClassification", "text-classification", ["I loved it.", "Dreadful."],
     {"top_k": 2, "function_to_apply": "softmax"}),
    ("BertForTokenClassification", "token-classification", ["Alice met Bob in Paris."],
     {"aggregation_strategy": "simple"}),
], ids=["fill-mask", "text-classification", "token-classification"])
def test_pipeline_route_text_tasks_equal_transformers(tmp_path, minilm_path, arch, task, inputs, parameters):
    folder = tiny_bert_head(tmp_path, minilm_path, arch)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with ThreadedServer(EnergonModel.from_pretrained(folder), tokenizer, ServeSettings("bert")) as server:
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["task"] == task
        response = httpx.post(server.url + "/v1/pipeline", json={"inputs": inputs, "parameters": parameters},
                              timeout=60)
        assert response.status_code == 200, response.text
        theirs = transformers.pipeline(task, model=str(folder))(inputs, **parameters)
        close_results(response.json(), theirs)
        wrong = httpx.post(server.url + "/v1/pipeline", json={"inputs": inputs, "parameters": {"top_k": "3"}})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "parameters"


def test_pipeline_route_image_feature_extraction_equals_transformers(tmp_path):
    tiny_vit(tmp_path, "ViTModel")
    picture, png = random_picture(30, 40, seed=1)
    with ThreadedServer(EnergonModel.from_pretrained(tmp_path), None, ServeSettings("vit")) as server:
        response = httpx.post(server.url + "/v1/pipeline", timeout=60, json={
            "inputs": base64.b64encode(png).decode(), "parameters": {"pool": True}})
        assert response.status_code == 200, response.text
        theirs = transformers.pipeline("image-feature-extraction", model=str(tmp_path))(picture, pool=True)
        close_results(response.json(), theirs)
