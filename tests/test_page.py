"""The document-QA page of `dysco-edge serve` and the API under it (/v1/documents, `document`,
`return_focus`), against the real server in a subprocess on 127.0.0.1 with SmolLM2-135M-Instruct.

Oracles: the real `openai` client's parsing; the in-process Model with the same prompt and
DySCO settings (greedy: answers and focus must be equal); answers asked one at a time against
answers asked at once; a real multi-page PDF; and, for the page, headless Chromium (Debian's
`chromium` and `chromium-driver`) driven by Selenium, checked against the API's own answers.
Screenshots of each state go to the test's tmp folder (and, with DYSCO_EDGE_README_SHOT=1, the
answer with its focus to docs/page.png for the README).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

import models  # noqa: E402
from dysco_edge import Model  # noqa: E402
from dysco_edge.api import DOCUMENT_TEMPLATE  # noqa: E402
from dysco_edge.documents.focus import focus_passages  # noqa: E402
from dysco_edge.documents.readers import read_document  # noqa: E402
from test_documents import make_pdf, _encrypted  # noqa: E402
from test_server import N_CTX, _http, running_server  # noqa: E402

KEY = "page-key"
EVIDENCE = "The lighthouse lamp was repaired by Mara Quint on 3 March."
QUESTION = "Who repaired the lighthouse lamp?"
PAGES = [["Harbour authority yearly report", "The harbour opened for the season on 2 April.",
          "Forty fishing boats were registered this year.", "The ferry to the island ran twice a day in summer."],
         ["Repairs", "The north pier was painted white in May.", EVIDENCE,
          "A new crane was ordered for the east quay."],
         ["Finances", "Mooring fees rose by four percent.", "The cafe at the harbour gate made a small profit.",
          "The accounts were checked by an outside auditor."]]
NOTES = "# Garden notes\n\nThe roses were pruned in February.\n\n## Pond\n\nThe pond pump was replaced by Ivo Brandt.\n"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server("--api-key", KEY, log=tmp_path_factory.mktemp("page-srv") / "log") as s:
        yield s[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def pdf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "harbour-report.pdf"
    path.write_bytes(make_pdf(PAGES))
    return path


def _post(url: str, body: dict, key: str = KEY) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _register(server: str, body: dict) -> dict:
    status, raw = _post(f"{server}/v1/documents", body)
    assert status == 200, raw
    return json.loads(raw)


def _sse_data(raw: bytes) -> list:
    lines = [line[5:].strip() for line in raw.decode().splitlines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _open(server: str, doc_id: str) -> tuple[list, dict]:
    """Open a document with progress: (progress events, the opened event)."""
    status, raw = _post(f"{server}/v1/documents/{doc_id}/open", {"stream": True})
    assert status == 200, raw
    events = _sse_data(raw)
    assert events[-1]["object"] == "document.opened"
    return events[:-1], events[-1]


# ---- the API ----

def test_the_page_is_public_and_fetches_nothing_from_elsewhere(server):
    status, headers, html = _http("GET", f"{server}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    for name in ("page.js", "page.css"):
        status, _, body = _http("GET", f"{server}/static/{name}")
        assert status == 200 and f"/static/{name}".encode() in html
        assert b"http://" not in body and b"https://" not in body
    assert b"http://" not in html and b"https://" not in html
    assert _http("GET", f"{server}/v1/documents")[0] == 401


@pytest.mark.slow
def test_documents_by_path_and_upload_then_opened_from_the_kv_cache(server, pdf):
    doc = _register(server, {"path": str(pdf)})
    assert doc["text"] == read_document(pdf) and doc["filename"] == pdf.name
    assert [p["where"] for p in doc["places"]] == ["page 1", "page 2", "page 3"]
    assert all(doc["text"][p["start"]:].startswith(f"[{p['where']}]") for p in doc["places"])
    notes = _register(server, {"filename": "notes.md", "data": base64.b64encode(NOTES.encode()).decode()})
    assert notes["text"] == NOTES and [p["where"] for p in notes["places"]] == ["section: Garden notes", "section: Pond"]
    listed = json.loads(_http("GET", f"{server}/v1/documents", {"Authorization": f"Bearer {KEY}"})[2])
    assert {d["id"] for d in listed["data"]} >= {doc["id"], notes["id"]}

    progress, first = _open(server, doc["id"])
    assert first["how"] in ("prefilled", "loaded") and first["n_tokens"] > 100
    if first["how"] == "prefilled":
        assert first["saved"] and progress[-1]["prompt_progress"]["processed"] == first["n_tokens"]
    assert _open(server, doc["id"])[1]["how"] == "kept"
    assert _open(server, notes["id"])[1]["how"] in ("prefilled", "loaded")
    again = _open(server, doc["id"])[1]  # its cells left the context: back from the disk
    assert again["how"] == "loaded" and again["n_tokens"] == first["n_tokens"]
    status, raw = _post(f"{server}/v1/documents/{doc['id']}/open", {})
    assert status == 200 and json.loads(raw)["how"] == "kept"


@pytest.mark.slow
def test_bad_documents_are_400s_naming_the_file(server, tmp_path):
    locked = _encrypted(tmp_path, "pw").read_bytes()
    cases = [({"filename": "secret.pdf", "data": base64.b64encode(locked).decode()}, 400, "secret.pdf is an encrypted PDF"),
             ({"filename": "x.txt", "data": "not base64!"}, 400, "base64"),
             ({"data": "aGk="}, 400, "filename"),
             ({}, 400, "either path"),
             ({"path": str(tmp_path / "missing.pdf")}, 400, "document not found"),
             ({"filename": "long.txt", "data": base64.b64encode(b"word " * 3000).decode()}, 400, "larger --n-ctx")]
    for body, code, words in cases:
        status, raw = _post(f"{server}/v1/documents", body)
        assert status == code and words in json.loads(raw)["error"]["message"], (body.keys(), raw)
    assert _post(f"{server}/v1/documents/doc-nope/open", {})[0] == 404
    assert _post(f"{server}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                    "document": "doc-nope"})[0] == 404
    assert _post(f"{server}/v1/documents", {"path": "/etc/hostname"}, key="wrong")[0] == 401


def test_paths_are_refused_unless_the_server_is_local():
    from dysco_edge.server.documents import DocumentBody, DocumentStore
    from dysco_edge.server.responses import ApiError
    with pytest.raises(ApiError, match="loopback") as e:
        DocumentStore(None, allow_paths=False).register(DocumentBody(path="/etc/passwd"))
    assert e.value.status == 403


@pytest.fixture(scope="module")
def smollm2():
    with Model(models.smollm2_q4_1(), n_ctx=N_CTX) as m:
        yield m


def _expected_focus(model, messages, texts, mode="fast", top=8, max_tokens=24):
    gen = model.generate(messages=messages, dysco=model.head_map().to_config(mode=mode), max_new_tokens=max_tokens,
                         trace=True)
    return gen.text, [(p.region, p.start, p.end, p.text, round(p.weight, 6), p.where)
                      for p in focus_passages(model, gen, texts, top=top)]


def _focus_rows(focus: dict, key: str) -> list:
    return [(p[key] if key != "document" else 0, p["start"], p["end"], p["text"], p["weight"], p["where"])
            for p in focus["passages"]]


@pytest.mark.slow
def test_focus_of_a_document_answer_equals_in_process(server, client, smollm2, pdf):
    doc = _register(server, {"path": str(pdf)})
    messages = [{"role": "user", "content": DOCUMENT_TEMPLATE.format(document=doc["text"], question=QUESTION)}]
    text, expected = _expected_focus(smollm2, messages, [doc["text"]])
    assert expected[0][3] == EVIDENCE and expected[0][5] == "page 2"
    ask = dict(model="any", messages=[{"role": "user", "content": QUESTION}], max_tokens=24)
    extra = {"document": doc["id"], "return_focus": True, "dysco": {"mode": "fast"}}
    answer = client.chat.completions.create(**ask, extra_body=extra)
    focus = answer.model_extra["dysco"]["focus"]
    assert answer.choices[0].message.content == text
    assert all(p["document"] == doc["id"] for p in focus["passages"])
    assert _focus_rows(focus, "document") == expected and focus["steps"] == answer.usage.completion_tokens

    chunks = list(client.chat.completions.create(**ask, stream=True, extra_body=extra))
    with_focus = [c for c in chunks if (c.model_extra or {}).get("dysco")]
    assert len(with_focus) == 1 and with_focus[0].choices[0].finish_reason is not None
    assert with_focus[0].model_extra["dysco"]["focus"] == focus
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


@pytest.mark.slow
def test_focus_without_a_document_is_in_the_messages_and_null_when_plain(client, smollm2):
    content = "[page 1]\nAnna painted the fence on Tuesday.\nTom baked bread on Monday.\n\nWhat did Anna paint?"
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": content}]
    _, expected = _expected_focus(smollm2, messages, ["Answer briefly.", content], top=3, max_tokens=12)
    answer = client.chat.completions.create(model="any", messages=messages, max_tokens=12,
                                            extra_body={"return_focus": {"top": 3}, "dysco": {"mode": "fast"}})
    assert _focus_rows(answer.model_extra["dysco"]["focus"], "message") == expected and len(expected) == 3
    plain = client.chat.completions.create(model="any", messages=messages, max_tokens=4,
                                           extra_body={"return_focus": True, "dysco": False})
    assert plain.model_extra["dysco"] == {"applied": False, "status": "off", "focus": None}
    untouched = client.chat.completions.create(model="any", messages=messages, max_tokens=4)
    assert "focus" not in untouched.model_extra["dysco"]
    completion = client.completions.create(model="any", prompt=content, max_tokens=4,
                                           extra_body={"return_focus": True, "dysco": {"mode": "fast"}})
    spans = completion.model_extra["dysco"]["focus"]["passages"]
    assert spans and all(content[p["start"]:p["end"]] == p["text"] and "message" not in p for p in spans)


@pytest.mark.slow
def test_two_clients_on_two_documents_at_once_get_their_own_answers(server, client, pdf):
    docs = [_register(server, {"path": str(pdf)}),
            _register(server, {"filename": "notes.md", "data": base64.b64encode(NOTES.encode()).decode()})]
    questions = [QUESTION, "Who replaced the pond pump?"]

    def ask(i):
        return client.chat.completions.create(model="any", messages=[{"role": "user", "content": questions[i]}],
                                              max_tokens=20, extra_body={"document": docs[i]["id"], "return_focus": True})
    alone = [ask(0), ask(1)]
    together = [None, None]
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i))) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert together[i].choices[0].message.content == alone[i].choices[0].message.content
        focus = together[i].model_extra["dysco"]["focus"]
        assert focus == alone[i].model_extra["dysco"]["focus"]
        assert {p["document"] for p in focus["passages"]} == {docs[i]["id"]}
