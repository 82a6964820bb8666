"""The real server (python -m energon_hf.serve) on 127.0.0.1 with real HTTP clients (httpx, openai):
OpenAI-compatible results equal to the model's own greedy generate, streaming, concurrency, stop strings,
disconnects, API key, metrics, embeddings, and 4xx errors that name the field."""

import json
import os
import queue
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer

from energon_hf import EnergonModel

KEY = "test-key"
MAX_BATCH_TOKENS = 24  # the generation server's step budget: the tests' longer prompts go in chunks
AUTH = {"Authorization": f"Bearer {KEY}"}


def start_server(*args: str, key: str | None = KEY, timeout: float = 120):
    """python -m energon_hf.serve ARGS on a port it picks itself (--port 0: no two tests can race for one),
    once it prints where it listens: (process, url). A thread keeps reading its output (a full pipe would
    block the server); `process.output` holds the lines."""
    env = {k: v for k, v in os.environ.items() if k != "ENERGON_HF_API_KEY"}
    if key is not None:
        env["ENERGON_HF_API_KEY"] = key
    process = subprocess.Popen([sys.executable, "-P", "-m", "energon_hf.serve", *args, "--port", "0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process.output = []
    listening = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            process.output.append(line)
            if line.startswith("listening on "):
                listening.put(line.split()[-1])
        listening.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = listening.get(timeout=timeout)
    except queue.Empty:
        url = None
    if url is None:
        process.kill()
        raise RuntimeError(f"the server did not come up: {''.join(process.output)[-3000:]}")
    return process, url


@pytest.fixture(scope="module")
def server(chat_llama):
    process, url = start_server("--model", str(chat_llama), "--served-name", "tiny", "--kv-cache-tokens", "4096",
                                "--max-batch-tokens", str(MAX_BATCH_TOKENS))
    yield url
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def local(chat_llama):
    return EnergonModel.from_pretrained(chat_llama)


def greedy(model: EnergonModel, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    tokens = out[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def greedy_each(model: EnergonModel, prompts: list[list[int]], news: list[int]) -> list[list[int]]:
    """Each prompt's greedy tokens, from one left-padded generate call (padding-free inside, so each row is
    what the prompt gets alone; the parity tests check that)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max(news), do_sample=False)[:, width:].tolist()
    eos = model.generation_config.eos_token_id
    cut = [row[:n] for row, n in zip(out, news, strict=True)]
    return [row[: row.index(eos) + 1] if eos in row else row for row in cut]


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "tiny", "temperature": 0, **body}, headers=AUTH,
                      timeout=120)


def test_models_and_health(server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(server + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"


def test_greedy_completion_equals_generate(server, local, chat_llama):
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    prompt = [5, 17, 99, 1000, 3]
    body = complete(server, prompt=prompt, max_tokens=12).json()
    expected = greedy(local, prompt, 12)
    assert body["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": len(expected), "total_tokens": 5 + len(expected)}
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")


def test_stream_gives_the_same_text(server):
    whole = complete(server, prompt="The capital of France is", max_tokens=10).json()["choices"][0]["text"]
    chunks, done = [], False
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, timeout=120,
                      json={"model": "tiny", "prompt": "The capital of France is", "max_tokens": 10,
                            "temperature": 0, "stream": True}) as response:
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    assert done and "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_string_cuts_the_text(server):
    whole = complete(server, prompt="Once upon a time", max_tokens=12).json()["choices"][0]["text"]
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    cut = complete(server, prompt="Once upon a time", max_tokens=12, stop=[stop]).json()["choices"][0]
    assert cut["text"] == whole[:whole.index(stop)] and cut["finish_reason"] == "stop"


def test_openai_client_chat_and_stream(server, local, chat_llama):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = tokenizer.decode(greedy(local, list(prompt["input_ids"]), 8), skip_special_tokens=True)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_concurrent_requests_all_answered_as_if_alone(server, local):
    """200 requests of mixed lengths at once: every one is answered, with the greedy tokens it gets alone."""
    count = 200
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 4000, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 60, (count,), generator=gen)]
    news = [int(n) for n in torch.randint(1, 10, (count,), generator=gen)]
    answers = [None] * count

    def ask(i: int) -> None:
        answers[i] = complete(server, prompt=prompts[i], max_tokens=news[i]).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    tokenizer = transformers.AutoTokenizer.from_pretrained(local.folder)
    for i, (answer, expected) in enumerate(zip(answers, greedy_each(local, prompts, news), strict=True)):
        assert answer is not None and answer["usage"]["completion_tokens"] == len(expected), i
        assert answer["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True), i
    metrics = httpx.get(server + "/metrics", headers=AUTH).text
    assert "energon_batch_size_bucket" in metrics and "energon_requests_total" in metrics


def test_a_client_that_disconnects_frees_its_sequence(server):
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2000, "stream": True}) as response:
        next(response.iter_lines())  # one chunk, then hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(server + "/metrics", headers=AUTH).text
        if "energon_running_sequences 0.0" in metrics:
            break
        time.sleep(0.2)
    assert "energon_running_sequences 0.0" in metrics
    assert complete(server, prompt=[5, 6], max_tokens=2).status_code == 200


@pytest.mark.parametrize("body,status,field", [
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "n": 1000}, 400, "n"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [1] * 5000}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": [10 ** 9]}, 400, "prompt"),
], ids=["max_tokens<=0", "missing-prompt", "wrong-type", "unknown-model", "n", "empty", "too-long",
        "beyond-context", "bad-token-id"])
def test_bad_requests_are_4xx_naming_the_field(server, body, status, field):
    response = httpx.post(server + "/v1/completions", json={"model": "tiny", **body}, headers=AUTH, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field or field in error["message"]


def test_malformed_json_auth_and_size_limit(server):
    response = httpx.post(server + "/v1/completions", content=b"{not json", headers={**AUTH,
                          "Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "hi"}).status_code == 401
    assert httpx.get(server + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    huge = {"model": "tiny", "prompt": "x" * (9 << 20)}  # over the default --max-body-bytes (8 MiB)
    assert httpx.post(server + "/v1/completions", json=huge, headers=AUTH).status_code == 413
    assert complete(server, prompt=[5], max_tokens=1).status_code == 200  # still serving


def test_embeddings_on_minilm(minilm_path):
    process, url = start_server("--model", str(minilm_path), "--served-name", "minilm")
    try:
        # sentence-transformers' vectors: its max_seq_length (256) truncates the last text, the tokenizer's
        # model_max_length (512) would not
        texts = ["A man is eating food.", "A man is riding a horse.", "word " * 300]
        body = httpx.post(url + "/v1/embeddings", json={"model": "minilm", "input": texts}, headers=AUTH,
                          timeout=60).json()
        expected = SentenceTransformer(str(minilm_path), device="cpu").encode(texts, convert_to_tensor=True)
        got = torch.tensor([d["embedding"] for d in body["data"]])
        assert got.shape == (3, 384) and (got - expected).abs().max() < 1e-5
        wrong = httpx.post(url + "/v1/completions", json={"model": "minilm", "prompt": "hi"}, headers=AUTH)
        assert wrong.status_code == 400 and "encoder" in wrong.json()["error"]["message"]
    finally:
        process.terminate()
        process.wait(30)
    process, url = start_server("--model", str(minilm_path), "--served-name", "minilm", "--quantization", "int8")
    try:  # int8 embeddings: faithful (issue 17's bound), not float32's
        body = httpx.post(url + "/v1/embeddings", json={"model": "minilm", "input": texts}, headers=AUTH,
                          timeout=60).json()
        cosine = (torch.tensor([d["embedding"] for d in body["data"]]) * expected).sum(-1)
        assert cosine.min() >= 0.995 and cosine.min() < 1 - 1e-6
    finally:
        process.terminate()
        process.wait(30)


def test_n_choices_streamed_and_whole(server, local):
    prompt = [5, 17, 99, 1000, 3]
    expected = greedy(local, prompt, 6)
    body = complete(server, prompt=prompt, max_tokens=6, n=3).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in body["choices"]}) == 1 and body["usage"]["completion_tokens"] == 3 * len(expected)
    sampled = [complete(server, prompt=prompt, max_tokens=6, n=2, temperature=1.0, seed=7).json() for _ in range(2)]
    assert sampled[0]["choices"] == sampled[1]["choices"]  # a seed makes the choices reproducible ...
    assert sampled[0]["choices"][0]["text"] != sampled[0]["choices"][1]["text"]  # ... and each choice differs
    texts = {0: "", 1: ""}
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, timeout=120,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": 6, "n": 2, "temperature": 1.0,
                            "seed": 7, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                texts[choice["index"]] += choice["text"]
    assert [texts[0], texts[1]] == [c["text"] for c in sampled[0]["choices"]]


def test_best_of_answers_the_completions_with_the_best_logprob_per_token(server):
    """best_of=4 generates the four seeded choices that n=4 answers, and answers the n of them with the highest mean
    log-probability per token (OpenAI's "best"), best first, whole or streamed; their logprobs only where asked; all
    four count as completion tokens."""
    body = dict(prompt=[5, 17, 99, 1000, 3], max_tokens=6, temperature=1.0, seed=11)
    every = complete(server, n=4, logprobs=0, **body).json()
    mean = lambda c: sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"])  # noqa: E731
    ranked = sorted(every["choices"], key=mean, reverse=True)
    best = complete(server, n=1, best_of=4, **body).json()
    assert [(c["index"], c["text"], c["logprobs"]) for c in best["choices"]] == [(0, ranked[0]["text"], None)]
    assert best["usage"] == every["usage"]
    two = complete(server, n=2, best_of=4, logprobs=0, **body).json()["choices"]
    assert [c["text"] for c in two] == [c["text"] for c in ranked[:2]] and [mean(c) for c in two] == \
        [mean(c) for c in ranked[:2]]
    texts = {}  # streamed: the best ones come whole once all four are done
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, timeout=120,
                      json={"model": "tiny", **body, "n": 2, "best_of": 4, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert [texts[0], texts[1]] == [c["text"] for c in ranked[:2]]
    # a best_of below n (schema-valid: the schema cannot bound one field by another) answers n choices
    fewer = complete(server, n=3, best_of=2, **body).json()["choices"]
    assert [c["text"] for c in fewer] == [c["text"] for c in every["choices"][:3]]


def test_logprobs_are_transformers_log_softmax(server, chat_llama):
    """Completions' logprobs (with the 3 most likely tokens) and chat's (through the openai client) are the
    model's log-probabilities, as transformers computes them on the same weights."""
    prompt = [5, 17, 99, 1000, 3]
    body = complete(server, prompt=prompt, max_tokens=5, logprobs=3).json()["choices"][0]["logprobs"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(chat_llama).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
        logp = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1:-1].float(), -1)
    new = ids[0, len(prompt):].tolist()
    assert body["tokens"] == [tokenizer.decode([t]) for t in new]
    assert max(abs(a - b) for a, b in zip(body["token_logprobs"], logp[range(5), new].tolist(), strict=True)) < 1e-4
    for row, top in enumerate(body["top_logprobs"]):
        values, index = logp[row].topk(3)
        assert list(top) == [tokenizer.decode([t]) for t in index.tolist()]
        assert max(abs(a - b) for a, b in zip(top.values(), values.tolist(), strict=True)) < 1e-4
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6 for t in content)  # greedy: the most likely


def test_pipeline_route_text_generation_equals_transformers(server, chat_llama):
    hf = transformers.pipeline("text-generation", model=str(chat_llama), dtype=torch.float32)
    text = "The capital of France is"
    ours = httpx.post(server + "/v1/pipeline", headers=AUTH, timeout=120,
                      json={"inputs": text, "parameters": {"max_new_tokens": 8}}).json()
    assert ours == hf(text, max_new_tokens=8, do_sample=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = httpx.post(server + "/v1/pipeline", headers=AUTH, timeout=120,
                      json={"inputs": messages, "parameters": {"max_new_tokens": 8}}).json()
    assert chat == hf(messages, max_new_tokens=8, do_sample=False)
    wrong = httpx.post(server + "/v1/pipeline", headers=AUTH, json={"inputs": text, "parameters": {"beams": 2}})
    assert wrong.status_code == 400 and "beams" in wrong.json()["error"]["message"]


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=120,
                      json={"model": "tiny", "temperature": 0, "messages": [{"role": "user", "content": "Hi there"}],
                            **body})


def test_top_p_include_usage_max_completion_tokens_chat_stop_and_n(server):
    prompt = [5, 17, 99, 1000, 3]
    greedy_text = complete(server, prompt=prompt, max_tokens=8, ignore_eos=True).json()["choices"][0]["text"]
    # top_p that keeps only the most likely token samples the greedy text; plain sampling does not
    nucleus = complete(server, prompt=prompt, max_tokens=8, ignore_eos=True, temperature=1.0, top_p=1e-6, seed=3)
    sampled = complete(server, prompt=prompt, max_tokens=8, ignore_eos=True, temperature=1.0, seed=3)
    assert nucleus.json()["choices"][0]["text"] == greedy_text != sampled.json()["choices"][0]["text"]
    # stream_options.include_usage: a last chunk with no choices and the usage
    events = []
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, timeout=120,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": 8, "ignore_eos": True, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    # max_completion_tokens wins over max_tokens
    body = chat(server, max_completion_tokens=3, max_tokens=6, ignore_eos=True).json()
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    # chat n and stop
    whole = chat(server, max_tokens=12, ignore_eos=True, n=2).json()["choices"]
    assert [c["index"] for c in whole] == [0, 1] and whole[0]["message"] == whole[1]["message"]
    text = whole[0]["message"]["content"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = chat(server, max_tokens=12, ignore_eos=True, stop=stop).json()["choices"][0]
    assert cut["message"]["content"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("route,body,field", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
])
def test_over_20_top_logprobs_or_16_choices_is_a_400(server, route, body, field):
    response = httpx.post(server + route, headers=AUTH, json={"model": "tiny", **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def scrape(url: str) -> dict[str, float]:
    """/metrics as {sample name with labels: value}."""
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_a_long_prompt_goes_in_chunks_of_max_batch_tokens(server, local, chat_llama):
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    prompt = list(range(5, 65))  # 60 tokens: chunks of 24, 24 and 12, the last one sampling
    before = scrape(server)
    body = complete(server, prompt=prompt, max_tokens=4).json()
    after = scrape(server)
    assert body["choices"][0]["text"] == tokenizer.decode(greedy(local, prompt, 4), skip_special_tokens=True)
    mixed = 'energon_batch_size_count{kind="mixed"}'
    assert after[mixed] - before.get(mixed, 0.0) >= 3


def test_metrics_have_vllms_latencies_and_token_counts(server):
    before = scrape(server)
    body = complete(server, prompt=[5, 17, 99], max_tokens=5, ignore_eos=True, n=2).json()
    after = scrape(server)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert body["usage"]["completion_tokens"] == 10
    assert delta("energon_prompt_tokens_total") == 3
    assert delta("energon_generated_tokens_total") == 10
    assert delta("energon_time_to_first_token_seconds_count") == 2  # one first token per choice
    assert delta("energon_inter_token_latency_seconds_count") == 8  # and four gaps each
    assert delta("energon_time_to_first_token_seconds_sum") > 0
    assert "energon_preemptions_total" in after and after["energon_kv_cache_blocks_used"] == 0
