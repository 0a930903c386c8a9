"""`dysco-edge serve` as a user runs it: the real server in a subprocess on 127.0.0.1 with
SmolLM2-135M-Instruct (Q4_1), spoken to by the real `openai` client.

Oracles: the in-process `Model.generate` with the same settings (greedy, so answers must
be equal token for token), the openai client's own parsing of every response and chunk,
and llama-server's documented error shape for an overflowing prompt.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

import models  # noqa: E402
from dysco_edge import Model  # noqa: E402

N_CTX = 2048
KEY = "test-key"
DOC = "Tom baked bread on Monday. Anna painted the fence on Tuesday. Sofia wrote a letter on Friday. " * 6
QUESTION = [{"role": "user", "content": DOC + "\n\nQuestion: What did Anna do on Tuesday?"}]
STRONG = {"strength": 99.0, "top_k": 8}  # hard mask: the answer differs from plain decoding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*extra: str, log: Path, model: Path | None = None, n_ctx: int = N_CTX):
    """`dysco-edge serve` (SmolLM2 unless told) on a free loopback port; yields (base_url, process)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "dysco_edge.cli", "serve", str(model or models.smollm2_q4_1()), "--port", str(port),
           "--n-ctx", str(n_ctx), "--log-level", "warning", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _http(method: str, url: str, headers: dict = {}) -> tuple[int, dict, bytes]:
    """A bare HTTP request (status, lower-cased headers, body), outside any client library."""
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _wait_healthy(base: str, proc, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError):
            if _http("GET", f"{base}/health")[0] == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"the server did not answer /health in {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # DySCO for requests naming none: most tests here are about it (the default, plain, has a test of its own)
    with running_server("--api-key", KEY, "--queue", "32", "--dysco-mode", "fast",
                        log=tmp_path_factory.mktemp("srv") / "log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model():
    with Model(models.smollm2_q4_1(), n_ctx=N_CTX) as m:
        yield m


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.slow
def test_chat_with_dysco_equals_in_process_generate(client, model):
    expected = model.generate(messages=QUESTION, dysco=model.head_map().to_config(mode="fast"), max_new_tokens=12)
    raw = client.chat.completions.with_raw_response.create(model="any", messages=QUESTION, max_tokens=12)
    assert raw.headers["x-dysco"] == "on"
    answer = raw.parse()
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason  # "stop" or "length" in both vocabularies
    assert answer.usage.prompt_tokens == expected.n_prompt
    assert answer.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    text, chunks = _stream_text(stream)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its prefix reused


@pytest.mark.slow
def test_dysco_off_and_knobs_equal_in_process(client, model):
    plain = model.generate(messages=QUESTION, dysco=None, max_new_tokens=10).text
    strong = model.generate(messages=QUESTION, dysco=model.head_map().to_config(**STRONG, mode="fast"),
                            max_new_tokens=10).text
    assert plain != strong  # otherwise this test could not tell the modes apart
    for dysco, expected, header in ((False, plain, "off"), (STRONG, strong, "on")):
        raw = client.chat.completions.with_raw_response.create(model="any", messages=QUESTION, max_tokens=10,
                                                               extra_body={"dysco": dysco})
        assert raw.headers["x-dysco"] == header
        assert raw.parse().choices[0].message.content == expected


@pytest.mark.slow
def test_completions_is_raw_text_without_template(client, model):
    prompt = "The capital of France is"
    expected = model.generate(token_ids=model.tokenize(prompt, add_bos=True, special=True), dysco=None,
                              max_new_tokens=6)
    answer = client.completions.create(model="any", prompt=prompt, max_tokens=6, extra_body={"dysco": False})
    assert answer.choices[0].text == expected.text
    assert answer.usage.prompt_tokens == expected.n_prompt
    stream = client.completions.create(model="any", prompt=prompt, max_tokens=6, stream=True,
                                       extra_body={"dysco": False})
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected.text


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_too_long_is_llama_server_400_before_any_work(client, model, stream):
    messages = [{"role": "user", "content": "word " * 2500}]
    n_prompt = len(model.prompt_ids(messages=messages)[0])
    assert n_prompt + 1 > N_CTX
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="any", messages=messages, max_tokens=4, stream=stream)
    error = err.value.response.json()["error"]
    assert error["type"] == "exceed_context_size_error"
    assert (error["n_prompt_tokens"], error["n_ctx"], error["code"]) == (n_prompt, N_CTX, 400)


@pytest.mark.slow
@pytest.mark.parametrize("dysco, param, words", [
    ({"strength": -1}, "dysco.strength", "a finite number > 0"),
    ({"decay": 1.5}, "dysco.decay", "a number in [0, 1)"),
    ({"strenght": 2}, "dysco.strenght", "unknown option (known: "),
    ({"dynamic": "yes"}, "dysco.dynamic", "true or false"),
    ("sometimes", "dysco", "expected \"auto\", true, false or an object"),
])
def test_bad_dysco_knob_is_400_naming_field_and_allowed_values(client, dysco, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="any", messages=QUESTION, max_tokens=4, extra_body={"dysco": dysco})
    error = err.value.response.json()["error"]
    assert error["param"] == param and words in error["message"]


@pytest.mark.slow
def test_unsupported_field_is_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="any", messages=QUESTION, max_tokens=4, n=2)
    assert err.value.response.json()["error"]["param"] == "n"


@pytest.mark.slow
def test_progress_chunks_then_prefix_reused_by_a_follow_up(client):
    document = "The archive lists ships, crews and ports by year. " * 120  # ~1400 tokens: 3 prefill batches

    def ask(question):
        stream = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": f"{document}\n\nQuestion: {question}"}],
            max_tokens=3, stream=True, stream_options={"include_usage": True}, extra_body={"return_progress": True})
        chunks = list(stream)
        progress = [c.model_extra["prompt_progress"] for c in chunks if (c.model_extra or {}).get("prompt_progress")]
        assert all(c.choices == [] for c in chunks if (c.model_extra or {}).get("prompt_progress"))
        return progress, chunks[-1].usage

    progress, usage = ask("Which ship came first?")
    assert len(progress) >= 3
    processed = [p["processed"] for p in progress]
    assert processed == sorted(processed) and processed[-1] == progress[-1]["total"] == usage.prompt_tokens
    assert all(p["cache"] == progress[0]["cache"] <= p["processed"] for p in progress)
    assert all(p["time_ms"] >= 0 for p in progress)

    follow_up, usage = ask("Which port was busiest?")
    assert follow_up[-1]["cache"] == usage.prompt_tokens_details.cached_tokens > 1000  # the document's KV kept
    assert follow_up[-1]["processed"] == follow_up[-1]["total"] == usage.prompt_tokens


@pytest.mark.slow
@pytest.mark.slow
def test_fast_is_the_servers_default_and_exact_is_asked_for_by_name(client, model):
    exact = model.generate(messages=QUESTION, dysco="auto", max_new_tokens=10)
    assert exact.dysco.mode == "exact"  # the API's default stays the paper's method
    static = model.generate(messages=QUESTION, dysco=model.head_map().to_config(dynamic=False), max_new_tokens=10)
    for knobs, expected in (({"mode": "exact"}, exact.text), ({"dynamic": False}, static.text)):
        answer = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=10,
                                                extra_body={"dysco": knobs})
        assert answer.choices[0].message.content == expected


def test_disconnect_mid_stream_frees_the_model_for_the_next_request(client, model):
    long = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Write a long story."}],
                                          max_tokens=1500, stream=True, extra_body={"dysco": False})
    pieces = [c for _, c in zip(range(4), long)]
    assert len(pieces) == 4
    long.close()  # the client goes away with ~1500 tokens still to generate
    t0 = time.perf_counter()
    expected = model.generate(messages=QUESTION, dysco=model.head_map().to_config(mode="fast"), max_new_tokens=6).text
    in_process_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    answer = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=6)
    server_s = time.perf_counter() - t0
    assert answer.choices[0].message.content == expected
    # had the abandoned generation kept running, this request would have waited for ~1500 tokens
    assert server_s < 10 + 3 * in_process_s, (server_s, in_process_s)


@pytest.mark.slow
def test_api_key_required_on_v1_but_not_health(server):
    base = server[0]
    assert json.loads(_http("GET", f"{base}/health")[2]) == {"status": "ok", "slots_idle": 1, "slots_processing": 0}
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):  # 401 even before the (bad) body is looked at
        wrong.chat.completions.create(model="any", messages=QUESTION, max_tokens=2, extra_body={"dysco": {"x": 1}})
    status, _, body = _http("GET", f"{base}/v1/models")  # no Authorization header at all
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    models_list = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY).models.list()
    assert [m.id for m in models_list.data] == [models.smollm2_q4_1().name]
    # CORS is off unless asked for: no browser origin is allowed
    _, headers, _ = _http("OPTIONS", f"{base}/v1/models", {"Origin": "http://evil.example",
                                                           "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in headers


@pytest.mark.slow
def test_full_queue_is_503_with_retry_after_and_cors_when_asked(tmp_path):
    with running_server("--queue", "1", "--cors", "http://app.example", log=tmp_path / "log") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        busy = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Write a story."}],
                                              max_tokens=1500, stream=True, extra_body={"dysco": False})
        next(iter(busy))  # the worker is busy with it
        waiting = threading.Thread(target=lambda: client.chat.completions.create(
            model="any", messages=QUESTION, max_tokens=2))
        waiting.start()
        time.sleep(1.0)  # it is now in the queue's only place
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="any", messages=QUESTION, max_tokens=2)
        assert err.value.status_code == 503 and int(err.value.response.headers["retry-after"]) >= 1
        busy.close()
        waiting.join(120)
        assert not waiting.is_alive()
        status, headers, _ = _http("OPTIONS", f"{base}/v1/models", {"Origin": "http://app.example",
                                                                    "Access-Control-Request-Method": "GET"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"


def _vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


LOAD_QUESTIONS = ["What did Tom do?", "Who painted the fence?", "When did Sofia write?", "What did Anna paint?",
                  "Who wrote a letter?"]


def _load_request(client, i: int) -> tuple[int, str]:
    """Request i of the load: five document questions, streamed or not."""
    q = i % len(LOAD_QUESTIONS)
    messages = [{"role": "user", "content": f"{DOC}\n\nQuestion: {LOAD_QUESTIONS[q]}"}]
    if i % 2:
        stream = client.chat.completions.create(model="any", messages=messages, max_tokens=4, stream=True)
        return q, "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    return q, client.chat.completions.create(model="any", messages=messages, max_tokens=4).choices[0].message.content


@pytest.mark.slow
def test_load_8_clients_x_25_requests(server, capsys):
    base, proc = server
    clients = [openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=600) for _ in range(8)]
    expected = dict(_load_request(clients[0], i) for i in range(2 * len(LOAD_QUESTIONS)))  # one after another
    rss_start = _vm_rss_kib(proc.pid)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: [_load_request(c, i) for i in range(25)], clients))
    seconds = time.perf_counter() - t0
    rss_end = _vm_rss_kib(proc.pid)
    answers = [a for per_client in results for a in per_client]
    assert len(answers) == 200
    assert all(text == expected[q] for q, text in answers)
    report = {"requests": 200, "seconds": round(seconds, 1), "rss_start_mib": round(rss_start / 1024, 1),
              "rss_end_mib": round(rss_end / 1024, 1)}
    with capsys.disabled():
        print(f"\nserver load: {json.dumps(report)}")
    assert rss_end - rss_start < 32 * 1024, report  # flat: 200 requests may not add 32 MiB


@pytest.mark.slow
def test_model_without_qr_heads_answers_plainly_under_auto_and_says_so(tmp_path):
    from dysco_edge import DyscoConfig
    path = models.tiny_llama_f32()  # a random model: no head map anywhere
    knobs = {"qr_heads": [[1, 0], [2, 3]], "top_k": 8}
    with Model(path, n_ctx=N_CTX) as local:
        assert local.head_map() is None
        ids = local.tokenize("The harbour log", add_bos=True, special=True)
        plain = local.generate(token_ids=ids, dysco=None, max_new_tokens=6).text
        # the server decodes in fast mode unless the request names a mode
        dysco = local.generate(token_ids=ids, dysco=DyscoConfig.from_dict({**knobs, "mode": "fast"}), max_new_tokens=6).text
    with running_server("--dysco-mode", "fast", log=tmp_path / "log", model=path) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        raw = client.completions.with_raw_response.create(model="any", prompt="The harbour log", max_tokens=6)
        assert raw.headers["x-dysco"] == "off; reason=no QR heads for this model"
        body = raw.http_response.json()
        assert body["dysco"]["applied"] is False and body["choices"][0]["text"] == plain
        with pytest.raises(openai.BadRequestError) as err:  # true insists on DySCO
            client.completions.create(model="any", prompt="The harbour log", max_tokens=6, extra_body={"dysco": True})
        assert err.value.response.json()["error"]["param"] == "dysco"
        raw = client.completions.with_raw_response.create(model="any", prompt="The harbour log", max_tokens=6,
                                                          extra_body={"dysco": knobs})
        assert raw.headers["x-dysco"] == "on" and raw.parse().choices[0].text == dysco


@pytest.mark.slow
def test_the_server_answers_plainly_by_default_and_with_dysco_when_asked(tmp_path, model):
    """Without --dysco-mode, "auto" (what a request gets when it names no dysco) is plain, said in the
    header; true runs fast DySCO."""
    plain = model.generate(messages=QUESTION, dysco=None, max_new_tokens=8).text
    fast = model.generate(messages=QUESTION, dysco=model.head_map().to_config(mode="fast"), max_new_tokens=8).text
    with running_server(log=tmp_path / "log") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        raw = client.chat.completions.with_raw_response.create(model="any", messages=QUESTION, max_tokens=8)
        assert raw.headers["x-dysco"].startswith("off; reason=the server's default (--dysco-mode off)")
        assert raw.parse().choices[0].message.content == plain
        raw = client.chat.completions.with_raw_response.create(model="any", messages=QUESTION, max_tokens=8,
                                                               extra_body={"dysco": True})
        assert raw.headers["x-dysco"] == "on" and raw.parse().choices[0].message.content == fast
