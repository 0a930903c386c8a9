"""Several generations in one batch (`Model(parallel=N)`, `serve --parallel N`) on SmolLM2-135M.

Oracle: the same requests answered one at a time by a Model with parallel=1 (greedy, so token for
token): each sequence has a KV stream of its own, laid out as alone, so batching must not change a
single token. The server is the real subprocess on 127.0.0.1, spoken to by real `openai` clients.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dysco_edge import Model
from dysco_edge.errors import InputError
from dysco_edge.runtime import batch

N_CTX = 1024
QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Count from one to ten.",
             "Name three colors.", "What do bees make?", "Describe a cat in one sentence."]
NEW = 24


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def test_parallel_is_checked_before_loading():
    with pytest.raises(InputError, match="parallel: expected"):
        Model("smollm2-135m", n_ctx=N_CTX, parallel=0)
    with pytest.raises(InputError, match="parallel=2 needs a fixed n_ctx"):
        Model("smollm2-135m", parallel=2)


@pytest.fixture(scope="module")
def single():
    with Model("smollm2-135m", n_ctx=N_CTX) as m:
        yield m


@pytest.fixture(scope="module")
def parallel():
    with Model("smollm2-135m", n_ctx=N_CTX, parallel=4) as m:
        yield m


def _alone(model, i: int, dysco=None, new: int = NEW) -> list[int]:
    model.prefill([])  # nothing cached: the answer may not depend on what ran before
    return model.generate(messages=_messages(i), dysco=dysco, max_new_tokens=new).token_ids


@pytest.mark.slow
def test_concurrent_plain_generations_equal_each_alone(single, parallel):
    expected = {i: _alone(single, i) for i in range(6)}
    started = [threading.Barrier(6)]

    def ask(i):
        started[0].wait()
        return parallel.generate(messages=_messages(i), dysco=None, max_new_tokens=NEW).token_ids
    with ThreadPoolExecutor(6) as pool:  # 6 threads on 4 slots: two wait and join when a slot frees
        got = dict(zip(range(6), pool.map(ask, range(6))))
    assert got == expected
    started[0] = threading.Barrier(4)
    with ThreadPoolExecutor(4) as pool:  # again: now each slot reuses or shares a cached prefix
        again = dict(zip(range(4), pool.map(ask, range(4))))
    assert again == {i: expected[i] for i in range(4)}
    assert all(s["state"] == "idle" for s in parallel.slots())


@pytest.mark.slow
def test_closing_one_stream_leaves_the_others_intact(single, parallel):
    expected = {i: single.generate(messages=_messages(i), dysco=None, max_new_tokens=NEW).text for i in (1, 2)}
    streams = {i: parallel.generate(messages=_messages(i), dysco=None, max_new_tokens=NEW, stream=True)
               for i in (0, 1, 2)}
    stop = threading.Event()
    stopped = parallel.generate(messages=_messages(3), dysco=None, max_new_tokens=200, stream=True, stop_event=stop)
    texts = {i: [] for i in streams}

    def read(i):
        for piece in streams[i]:
            texts[i].append(piece)
            if i == 0 and len(texts[i]) == 2:
                streams[i].close()  # the reader goes away mid-answer
                return
    readers = [threading.Thread(target=read, args=(i,)) for i in streams]
    for r in readers:
        r.start()
    first = next(iter(stopped))
    stop.set()
    rest = "".join(stopped)
    for r in readers:
        r.join(120)
    assert streams[0].result is None and len(texts[0]) == 2
    assert {i: "".join(texts[i]) for i in (1, 2)} == expected
    assert stopped.result.finish_reason == "interrupted" and len(stopped.result.token_ids) < 200
    assert (first + rest).startswith(single.generate(messages=_messages(3), dysco=None, max_new_tokens=1).text)


def test_a_parallel_model_refuses_static_dysco_and_runs_auto(parallel):
    with pytest.raises(InputError, match=r"Model\(parallel=4\) runs dynamic DySCO only.*parallel=1 for static"):
        parallel.generate(messages=_messages(0), dysco=parallel.head_map().to_config(dynamic=False), max_new_tokens=2)
    auto = parallel.generate(messages=_messages(0), max_new_tokens=2).dysco  # the head map's, template markers added
    assert (auto.mode, auto.qr_heads) == ("exact", parallel.head_map().qr_heads)
    assert all(s["state"] == "idle" for s in parallel.slots())


def test_dysco_generations_running_together_share_one_set_of_qr_heads(parallel):
    fast = parallel.head_map().to_config(mode="fast")
    running = parallel.generate(messages=_messages(1), dysco=fast, max_new_tokens=200, stream=True)
    next(iter(running))  # decoding with the head map's heads
    other = fast.replace(qr_heads=((0, 0), (1, 1)))
    with pytest.raises(InputError, match="one set of QR heads at a time"):
        parallel.generate(messages=_messages(2), dysco=other, max_new_tokens=4)
    running.close()
    assert parallel.generate(messages=_messages(2), dysco=other, max_new_tokens=2).dysco.qr_heads == ((0, 0), (1, 1))


# which generations run fast DySCO (one without context warmup: its first step probes), exact DySCO (a probe
# of its own before every batch step) or plainly
KINDS = {0: "fast", 1: None, 2: "fast, no warmup", 3: None, 4: "exact", 5: "fast"}


def _dysco(model, kind):
    if kind is None:
        return None
    return model.head_map().to_config(mode=kind.split(",")[0], **({"context_warmup": 0} if "no warmup" in kind else {}))


def _traced(model, i: int, new: int = 32) -> tuple[list[int], list[list[int]]]:
    """Token ids and, for DySCO, the selected set S of every step."""
    kind = KINDS[i]
    g = model.generate(messages=_messages(i), dysco=_dysco(model, kind), max_new_tokens=new, trace=kind is not None)
    return g.token_ids, [step.selected.tolist() for step in g.trace or []]


@pytest.mark.slow
def test_dysco_and_plain_generations_share_the_batch_each_as_alone(single, parallel):
    expected = {}
    for i in KINDS:
        single.prefill([])
        expected[i] = _traced(single, i)
    decoding = []  # how many slots decoded at once, sampled while they run

    def ask(i):
        # 0-3 claim the 4 slots at once and decode together; 4 and 5 join the running batch as slots free
        time.sleep(0.4 * max(0, i - 3))
        return _traced(parallel, i)
    with ThreadPoolExecutor(len(KINDS)) as pool:
        futures = {i: pool.submit(ask, i) for i in KINDS}
        while not all(f.done() for f in futures.values()):
            decoding.append(sum(s["state"] == "decode" for s in parallel.slots()))
            time.sleep(0.05)
        got = {i: f.result() for i, f in futures.items()}
    assert got == expected
    assert all(len(expected[i][1]) > 3 for i in KINDS if KINDS[i])  # S of every step was compared
    assert max(decoding) >= 3  # any three of them decoding together hold a DySCO one beside others
    assert all(s["state"] == "idle" for s in parallel.slots())


@pytest.mark.slow
def test_a_plain_request_after_a_dysco_one_on_its_prompt_answers_as_alone(single, parallel):
    # the DySCO run keeps only its prefilled cells: its context warmup's, fed one at a time, round
    # otherwise than a prefill, and the plain answer reusing them differed from the one it gets alone
    expected = _alone(single, 1)
    for model in (parallel, single):  # a slot of the batch, and the one sequence of a parallel=1 model
        model.generate(messages=_messages(1), dysco=model.head_map().to_config(mode="fast"), max_new_tokens=4)
        assert model.generate(messages=_messages(1), dysco=None, max_new_tokens=NEW).token_ids == expected


@pytest.mark.slow
def test_one_thread_cannot_hold_every_slot_and_wait_for_more():
    with Model("smollm2-135m", n_ctx=N_CTX, parallel=2) as m:
        streams = [m.generate(messages=_messages(i), dysco=None, max_new_tokens=50, stream=True) for i in range(3)]
        next(iter(streams[0]))
        next(iter(streams[1]))
        with pytest.raises(InputError, match="hold every slot"):
            next(iter(streams[2]))
        with pytest.raises(InputError, match="holds a slot"):
            m.prefill([])
        for s in streams[:2]:
            s.close()
        assert [s["state"] for s in m.slots()] == ["idle", "idle"]
        t0 = time.perf_counter()
        m.prefill([])  # both slots free: the whole context is this thread's at once
        assert time.perf_counter() - t0 < 30


@pytest.mark.slow
@pytest.mark.parametrize("step_s, interleaved", [(0.0, True), (60.0, False)])
def test_a_long_prompt_prefills_in_steps_the_running_stream_shares(monkeypatch, step_s, interleaved):
    # STEP_PREFILL_S 0: one chunk a step, the decoding slot gains a token between any two; 60 s: every
    # chunk in the step it started in. Either way the answer is the one it gets alone
    monkeypatch.setattr(batch, "STEP_PREFILL_S", step_s)
    long_prompt = " ".join(f"Entry {i}: the ship sailed north." for i in range(50))
    with Model("smollm2-135m", n_ctx=N_CTX, parallel=2, n_batch=64) as m:
        expected = m.generate(long_prompt, dysco=None, max_new_tokens=4).token_ids
        m.prefill([])
        running = m.generate(messages=_messages(0), dysco=None, max_new_tokens=400, stream=True)
        next(iter(running))
        seen = []  # the running slot's tokens at each of the long prompt's chunks

        def progress(done, total):
            if done < total:  # a chunk (the last prompt token goes as a single token, beside the running one)
                seen.append(max(s.get("n_generated", 0) for s in m.slots() if s.get("n_prompt") != total + 1))
        got = m.generate(long_prompt, dysco=None, max_new_tokens=4, progress=progress).token_ids
        running.close()
    assert got == expected and len(seen) >= 5
    steps = [b - a for a, b in zip(seen, seen[1:])]
    assert all(k == 1 for k in steps) if interleaved else set(steps) == {0}


@pytest.mark.slow
def test_a_claim_waits_for_one_step_at_most_while_others_decode(monkeypatch, parallel):
    # the step thread takes the context again right after each step: a newcomer (or a release) that only
    # blocked on the lock could wait many steps, until every run ended
    steps = [0]
    advance = batch.Batcher._advance

    def counted(self, slots):
        steps[0] += 1
        return advance(self, slots)
    monkeypatch.setattr(batch.Batcher, "_advance", counted)
    running = parallel.generate(messages=_messages(0), dysco=None, max_new_tokens=400, stream=True)
    pieces = iter(running)
    waited = []
    for _ in range(20):
        next(pieces)
        before = steps[0]
        with parallel._batcher._between_steps():
            waited.append(steps[0] - before)
    running.close()
    # one step may start before the claim is announced, and one that checked just before it
    assert max(waited) <= 2, waited


@pytest.mark.slow
def test_closing_a_dysco_stream_leaves_the_others_and_its_slot_intact(single, parallel):
    expected = {}
    for i in (0, 4):
        single.prefill([])
        expected[i] = _traced(single, i)
    closed = parallel.generate(messages=_messages(2), dysco=_dysco(parallel, "fast"), max_new_tokens=200, stream=True)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(_traced, parallel, 4)  # exact, beside the stream closed mid-answer
        pieces = iter(closed)
        next(pieces), next(pieces)
        closed.close()
        assert other.result() == expected[4]
    assert closed.result is None
    assert _traced(parallel, 0) == expected[0]  # a slot freed mid-DySCO serves the next one as alone


# ---- the server: `serve --parallel N` spoken to by real openai clients ----

openai = pytest.importorskip("openai")
from test_server import _http, _vm_rss_kib, running_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("parallel-srv") / "log"
    with running_server("--parallel", "4", "--queue", "2", "--api-key", "k", log=log, n_ctx=N_CTX) as running:
        yield running


@pytest.mark.slow
@pytest.mark.parametrize("flash, noted", [("off", False), ("on", True)])
def test_a_parallel_server_says_when_flash_attention_may_change_an_answer(tmp_path, flash, noted):
    log = tmp_path / "log"
    with running_server("--parallel", "2", "--flash-attn", flash, log=log, n_ctx=N_CTX):
        pass
    banner = log.read_text()
    assert "2 parallel slots" in banner
    assert ("with flash attention on, a request decoded beside others may get another answer" in banner) == noted


def _client(base: str):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=300)


def _ask(client, i: int, dysco, new: int = NEW) -> str:
    if i % 2:  # streamed and whole answers alike
        stream = client.chat.completions.create(model="any", messages=_messages(i), max_tokens=new, stream=True,
                                                extra_body={"dysco": dysco})
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    answer = client.chat.completions.create(model="any", messages=_messages(i), max_tokens=new,
                                            extra_body={"dysco": dysco})
    return answer.choices[0].message.content


@pytest.mark.slow
def test_concurrent_clients_get_the_answers_each_gets_alone(server, single):
    expected = {}
    for i in range(4):
        single.prefill([])
        expected[i] = single.generate(messages=_messages(i), dysco=None, max_new_tokens=NEW).text
    clients = [_client(server[0]) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(range(4), pool.map(lambda i: _ask(clients[i], i, False), range(4))))
    assert got == expected


def test_a_parallel_server_answers_auto_as_its_mode_says_and_refuses_static_by_name(server, single):
    client = _client(server[0])
    raw = client.chat.completions.with_raw_response.create(model="any", messages=_messages(0), max_tokens=NEW)
    single.prefill([])  # cells a DySCO run kept (its warmup's, fed one at a time) round differently from a prefill
    assert raw.headers["x-dysco"].startswith("off; reason=the server's default (--dysco-mode off)")
    assert raw.parse().choices[0].message.content == single.generate(messages=_messages(0), dysco=None,
                                                                     max_new_tokens=NEW).text
    with pytest.raises(openai.BadRequestError, match="static DySCO .dynamic false. needs --parallel 1"):
        client.chat.completions.create(model="any", messages=_messages(0), max_tokens=2,
                                       extra_body={"dysco": {"dynamic": False}})


@pytest.mark.slow
def test_dysco_and_plain_clients_share_the_batch_each_as_alone(server, single):
    # dysco true is fast on a server whose --dysco-mode is off; 6 clients on 4 slots and a queue of 2
    dysco = {0: True, 1: False, 2: True, 3: False, 4: {"mode": "exact"}, 5: {"mode": "exact"}}
    heads = single.head_map()
    expected = {}
    for i, d in dysco.items():
        single.prefill([])
        config = None if d is False else heads.to_config(mode="fast" if d is True else "exact")
        expected[i] = single.generate(messages=_messages(i), dysco=config, max_new_tokens=NEW).text
    clients = [_client(server[0]) for _ in dysco]
    with ThreadPoolExecutor(len(dysco)) as pool:  # odd ones streamed
        got = dict(zip(dysco, pool.map(lambda i: _ask(clients[i], i, dysco[i]), dysco)))
    assert got == expected


@pytest.mark.slow
def test_cancelled_stream_leaves_the_others_intact_and_slots_report_them(server, single):
    base = server[0]
    expected = {i: single.generate(messages=_messages(i), dysco=None, max_new_tokens=NEW).text for i in (1, 2)}
    long = _client(base).chat.completions.create(model="any", max_tokens=600, stream=True, extra_body={"dysco": False},
                                                 messages=[{"role": "user", "content": "Write a long story."}])
    next(iter(long))
    status, _, body = _http("GET", f"{base}/slots", {"Authorization": "Bearer k"})
    import json
    assert status == 200 and [s["state"] for s in json.loads(body)].count("decode") == 1
    assert _http("GET", f"{base}/slots")[0] == 401  # behind the key, as every route but /health
    health = json.loads(_http("GET", f"{base}/health")[2])
    assert health == {"status": "ok", "slots_idle": 3, "slots_processing": 1}
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(_ask, _client(base), i, False) for i in (1, 2)]
        time.sleep(0.5)
        long.close()  # the client goes away while the two others decode beside it
        assert {i: f.result() for i, f in zip((1, 2), others)} == expected
    deadline = time.time() + 30
    while json.loads(_http("GET", f"{base}/health")[2])["slots_processing"] and time.time() < deadline:
        time.sleep(0.2)
    assert json.loads(_http("GET", f"{base}/health")[2])["slots_processing"] == 0


@pytest.mark.slow
def test_requests_beyond_the_slots_queue_then_503(server):
    base = server[0]
    busy = [_client(base).chat.completions.create(model="any", max_tokens=800, stream=True, extra_body={"dysco": False},
                                                  messages=[{"role": "user", "content": f"Write story {i}."}])
            for i in range(4)]
    for s in busy:
        next(iter(s))  # four slots decode
    waiting = ThreadPoolExecutor(2)
    queued = [waiting.submit(_ask, _client(base), i, False, 2) for i in range(2)]  # the queue's 2 places
    time.sleep(1.0)
    with pytest.raises(openai.APIStatusError) as err:
        _ask(_client(base), 0, False, 2)
    assert err.value.status_code == 503 and int(err.value.response.headers["retry-after"]) >= 1
    for s in busy:
        s.close()
    assert all(isinstance(f.result(timeout=120), str) for f in queued)
    waiting.shutdown()


@pytest.mark.slow
def test_rss_stays_flat_over_a_load_of_concurrent_clients(server, capsys):
    base, proc = server
    clients = [_client(base) for _ in range(4)]
    expected = {i: _ask(clients[0], i, False, 6) for i in range(len(QUESTIONS))}
    rss_start = _vm_rss_kib(proc.pid)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda c: [(i, _ask(c, i, False, 6)) for i in range(30)], clients))
    rss_end = _vm_rss_kib(proc.pid)
    assert all(text == expected[i % len(QUESTIONS)] for per_client in answers for i, text in per_client)
    with capsys.disabled():
        print(f"\nparallel load: 120 requests, rss {rss_start / 1024:.1f} -> {rss_end / 1024:.1f} MiB")
    assert rss_end - rss_start < 32 * 1024  # flat: 120 requests may not add 32 MiB
