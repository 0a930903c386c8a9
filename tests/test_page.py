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
    with running_server("--api-key", KEY, "--dysco-mode", "fast", log=tmp_path_factory.mktemp("page-srv") / "log") as s:
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


# ---- the page, in a real browser ----

def _browser_or_skip():
    """Debian's chromium and chromium-driver, and selenium: under CI their absence fails the run."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
        missing = [] if chromium and driver else ["chromium and chromium-driver (apt-get install -y chromium chromium-driver)"]
    except ImportError:
        missing = ["selenium (pip install '.[test]')"]
    if missing:
        message = f"the browser tests need {missing[0]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"screenshots: {folder}")
    return folder


def _shot(driver, shots: Path, name: str) -> None:
    driver.save_screenshot(str(shots / f"{name}.png"))


def _wait(driver, condition, timeout: float = 300):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def _css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, selector)


def _load(driver, server: str, key: str = KEY) -> None:
    driver.get(f"{server}/")
    if key is not None:
        driver.execute_script("localStorage.setItem('dysco-edge-api-key', arguments[0]); location.reload()", key)
    _wait(driver, lambda d: "SmolLM2" in _css(d, "#model")[0].text)


def _upload(driver, path: Path) -> None:
    """Choose the file in the page's upload input; wait until the document is opened."""
    _css(driver, "#file")[0].send_keys(str(path))
    _wait(driver, lambda d: any(li.get_attribute("data-state") in ("prefilled", "loaded", "kept")
                                and path.name in li.text for li in _css(d, "#doc-list li.selected")))


def _ask(driver, question: str) -> list:
    """Ask in the page; the last turn's answer cards once all are done."""
    n_turns = len(_css(driver, ".turn"))
    _css(driver, "#question")[0].send_keys(question)
    _css(driver, "#ask-button")[0].click()
    _wait(driver, lambda d: len(_css(d, ".turn")) > n_turns)
    return _css(driver, ".turn")[-1].find_elements("css selector", ".answer")


def _api_answer(client, doc_id: str, question: str, dysco, max_tokens: int = 160) -> str:
    answer = client.chat.completions.create(model="any", messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, extra_body={"document": doc_id, "dysco": dysco})
    return answer.choices[0].message.content


@pytest.mark.slow
def test_page_asks_for_the_key_then_opens_a_pdf(browser, server, pdf, shots):
    browser.get(f"{server}/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    _wait(browser, lambda d: "API key" in _css(d, "#status")[0].text)
    _shot(browser, shots, "1-asks-for-the-key")
    key = _css(browser, "#key")[0]
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    _wait(browser, lambda d: "SmolLM2" in _css(d, "#model")[0].text)
    _upload(browser, pdf)
    state = _css(browser, "#doc-list li.selected .state")[0].text
    assert "prefilled in" in state or "loaded from the KV cache" in state or "in the context already" in state
    assert [a.text for a in _css(browser, "#places a")] == ["page 1", "page 2", "page 3"]
    assert EVIDENCE in _css(browser, "#doc-text")[0].text
    _shot(browser, shots, "2-pdf-opened")


@pytest.mark.slow
def test_page_streams_the_answer_and_highlights_the_evidence(browser, server, client, pdf, shots):
    _load(browser, server)
    _upload(browser, pdf)
    # every text node the page adds to an answer, with when it came (the page appends one per piece)
    browser.execute_script("""
        window.pieces = [];
        new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes)
            if (n.nodeType === 3 && n.parentElement.classList.contains('text')) window.pieces.push([performance.now(), n.data]);
        }).observe(document.querySelector('#turns'), {childList: true, subtree: true});""")
    cards = _ask(browser, QUESTION)
    _wait(browser, lambda d: cards[0].find_element("css selector", ".text").text)
    if "done" not in cards[0].get_attribute("class"):  # the answer so far, when the shot is quicker than the model
        _shot(browser, shots, "3-answer-streaming")
    _wait(browser, lambda d: "done" in cards[0].get_attribute("class"))
    pieces = browser.execute_script("return window.pieces")
    text = cards[0].find_element("css selector", ".text").text
    assert text == _api_answer(client, _css(browser, "#doc-list li.selected")[0].get_attribute("data-id"),
                               QUESTION, {"mode": "fast"}).strip()
    assert len(pieces) >= 2 and pieces[-1][0] > pieces[0][0], pieces  # it came in pieces, over time
    top = _css(browser, '#doc-text mark[data-rank="1"]')[0]
    assert EVIDENCE in top.text
    assert float(top.get_attribute("data-weight")) == max(float(m.get_attribute("data-weight"))
                                                          for m in _css(browser, "#doc-text mark"))
    assert "page 2" in _css(browser, '#focus-list li[data-rank="1"]')[0].text
    _shot(browser, shots, "4-answer-with-focus")
    if os.environ.get("DYSCO_EDGE_README_SHOT") == "1":
        browser.save_screenshot(str(REPO / "docs" / "page.png"))
    _css(browser, '#focus-list li[data-rank="1"]')[0].click()
    assert "flash" in top.get_attribute("class")
    assert browser.execute_script("""const r = arguments[0].getBoundingClientRect(),
        v = document.querySelector('#viewer').getBoundingClientRect(); return r.top >= v.top && r.bottom <= v.bottom;""", top)


@pytest.mark.slow
def test_page_keeps_several_documents_and_reloads_one_from_the_kv_cache(browser, server, pdf, shots, tmp_path):
    # the same text registered before under another name: the page lists it, then shows the new name
    _register(server, {"filename": "old-name.md", "data": base64.b64encode(NOTES.encode()).decode()})
    _load(browser, server)
    _upload(browser, pdf)
    notes = tmp_path / "garden-notes.md"
    notes.write_text(NOTES)
    _upload(browser, notes)
    assert not [li for li in _css(browser, "#doc-list li") if "old-name.md" in li.text]
    assert "Pond" in [a.text.removeprefix("section: ") for a in _css(browser, "#places a")]
    first = [li for li in _css(browser, "#doc-list li") if pdf.name in li.text][0]
    first.click()
    _wait(browser, lambda d: first.get_attribute("data-state") == "loaded")
    assert "loaded from the KV cache" in first.text
    _shot(browser, shots, "5-second-document-then-back-from-the-kv-cache")


@pytest.mark.slow
def test_page_compares_plain_and_dysco_side_by_side(browser, server, client, pdf, shots):
    _load(browser, server)
    _upload(browser, pdf)
    _css(browser, "#compare")[0].click()
    browser.execute_script("document.querySelector('#mode').value = 'exact'")
    cards = _ask(browser, QUESTION)
    _wait(browser, lambda d: all("done" in c.get_attribute("class") for c in cards))
    doc_id = _css(browser, "#doc-list li.selected")[0].get_attribute("data-id")
    assert [c.get_attribute("data-kind") for c in cards] == ["plain", "dysco"]
    assert [c.find_element("css selector", "h3").text for c in cards] == ["plain", "DySCO (exact)"]
    for card, dysco in zip(cards, (False, {"mode": "exact"})):
        assert card.find_element("css selector", ".text").text == _api_answer(client, doc_id, QUESTION, dysco).strip()
    left, right = (c.rect for c in cards)
    assert left["y"] == right["y"] and left["x"] + left["width"] <= right["x"]  # side by side
    assert EVIDENCE in _css(browser, '#doc-text mark[data-rank="1"]')[0].text  # the DySCO answer's focus
    _shot(browser, shots, "6-compare")


@pytest.mark.slow
def test_two_tabs_answering_at_once_each_get_their_answer(browser, server, client, pdf, tmp_path):
    notes = tmp_path / "garden-notes.md"
    notes.write_text(NOTES)
    questions = {pdf.name: QUESTION, notes.name: "Who replaced the pond pump?"}
    tabs = []
    for path in (pdf, notes):
        if tabs:
            browser.switch_to.new_window("tab")
        _load(browser, server)
        _upload(browser, path)
        tabs.append(browser.current_window_handle)
    for handle, path in zip(tabs, (pdf, notes)):  # both asked before either is answered
        browser.switch_to.window(handle)
        _css(browser, "#question")[0].send_keys(questions[path.name])
        _css(browser, "#ask-button")[0].click()
    for handle, path in zip(tabs, (pdf, notes)):
        browser.switch_to.window(handle)
        card = _wait(browser, lambda d: _css(d, ".turn .answer.done") and _css(d, ".turn .answer.done")[-1])
        doc_id = _css(browser, "#doc-list li.selected")[0].get_attribute("data-id")
        assert card.get_attribute("data-doc") == doc_id
        assert card.find_element("css selector", ".text").text == _api_answer(client, doc_id, questions[path.name],
                                                                              {"mode": "fast"}).strip()
    browser.close()
    browser.switch_to.window(tabs[0])
