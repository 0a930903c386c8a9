"""What `dysco-edge serve` logs while it works: each request as it is queued, a long prefill's
progress, and each request's timing when it ends, in uvicorn's format beside uvicorn's own lines.
The real server runs as a subprocess and is spoken to by the real `openai` client."""
from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

openai = pytest.importorskip("openai")

from dysco_edge.server import queue as server_queue  # noqa: E402
from test_server import DOC, running_server  # noqa: E402


@pytest.mark.slow
def test_each_request_is_logged_with_its_prefill_and_decode_timing(tmp_path):
    log = tmp_path / "server.log"
    with running_server("--log-level", "info", log=log) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        answer = client.chat.completions.create(model="m", max_tokens=8, messages=[
            {"role": "user", "content": DOC + "\n\nQuestion: What did Anna do?"}])
        usage = answer.usage
        time.sleep(0.5)  # the worker logs the end just after the answer went out
    text = log.read_text()
    queued = re.search(r"^INFO: +request 1: (\d+) prompt tokens, at most 8 new, DySCO off; 0 ahead in the queue$", text, re.M)
    assert queued and int(queued.group(1)) == usage.prompt_tokens, text
    done = re.search(r"^INFO: +request 1: done in [\d.]+ s: prefill (\d+) tokens \(0 cached\) in [\d.]+ s "
                     r"\(\d+ tok/s\); (\d+) tokens generated, [\d.]+ tok/s after the first; finish (\w+)$", text, re.M)
    assert done and int(done.group(1)) == usage.prompt_tokens and int(done.group(2)) >= usage.completion_tokens, text
    assert re.search(r'^INFO: +127\.0\.0\.1:\d+ - "POST /v1/chat/completions HTTP/1\.1" 200', text, re.M)


def test_a_long_prefill_logs_its_progress(caplog, monkeypatch):
    channel = server_queue.Channel(asyncio.new_event_loop())
    channel.name = "request 7"
    channel.started = time.perf_counter() - 2 * server_queue.PROGRESS_LOG_S  # the prefill began a while ago
    with caplog.at_level(logging.INFO, logger="dysco_edge.server"):
        channel.progress(512, 4096)
        channel.progress(1024, 4096)  # too soon after the last line
        channel.progress(4096, 4096)  # the end: the request's own line says it
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and re.fullmatch(r"request 7: prefill 512/4096 tokens, \d+ s", lines[0])
