// The document-QA page of `dysco-edge serve`: everything it shows comes from the server's API
// (/v1/documents, /v1/chat/completions with "document", "return_progress" and "return_focus").
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { docs: new Map(), current: null, busy: false };
const KEY_STORE = "dysco-edge-api-key";
const MARKER = /^\[(page \d+|section: [^\]\n]{1,200})\]/;  // documents/markers.py

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("#key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try { message = (await response.json()).error.message; } catch (e) { /* not our JSON */ }
  if (response.status === 401) message += ": enter the server's API key at the top right";
  return new Error(message);
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// POST with an SSE answer: onEvent(object) for each data line until [DONE]
async function sse(path, body, onEvent) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      for (const line of event.split(/\r?\n/)) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        onEvent(obj);
      }
    }
  }
}

function say(message) { $("#status").textContent = message || ""; }

// ---- documents ----

function describeOpening(opened) {
  if (opened.how === "loaded") return `loaded from the KV cache in ${opened.seconds.toFixed(2)} s`;
  if (opened.how === "kept") return "in the context already";
  return `prefilled in ${opened.seconds.toFixed(1)} s${opened.saved ? " (saved to the KV cache)" : ""}`;
}

function addDocument(summary) {
  let doc = state.docs.get(summary.id);
  if (!doc) {
    const li = el("li", { className: "doc" }, el("div", { className: "name", textContent: summary.filename }),
                  el("div", { className: "state", textContent: `${summary.n_tokens} tokens` }));
    li.dataset.id = summary.id;
    li.addEventListener("click", () => selectDocument(summary.id));
    $("#doc-list").append(li);
    doc = { summary, li, text: null };
    state.docs.set(summary.id, doc);
  }
  doc.summary = summary;  // the same text registered again may come under another name
  doc.li.querySelector(".name").textContent = summary.filename;
  if (summary.text !== undefined) doc.text = summary.text;
  return doc;
}

function setDocState(doc, ...content) {
  const box = doc.li.querySelector(".state");
  box.replaceChildren(...content);
}

async function selectDocument(id) {
  const doc = state.docs.get(id);
  state.current = doc;
  for (const li of document.querySelectorAll("#doc-list li")) li.classList.toggle("selected", li.dataset.id === id);
  if (doc.text === null) addDocument(await api(`/v1/documents/${id}`));
  renderDocument(doc, []);
  $("#question").disabled = $("#ask-button").disabled = false;
  await openDocument(doc);
}

// load the document's KV prefix from the cache on disk, or prefill it, showing the progress
async function openDocument(doc) {
  const bar = el("progress", { max: 1, value: 0 });
  setDocState(doc, `${doc.summary.n_tokens} tokens · opening…`, bar);
  doc.li.dataset.state = "opening";
  try {
    await sse(`/v1/documents/${doc.summary.id}/open`, { stream: true }, (event) => {
      if (event.prompt_progress) {
        bar.max = event.prompt_progress.total;
        bar.value = event.prompt_progress.processed;
      } else if (event.object === "document.opened") {
        setDocState(doc, `${doc.summary.n_tokens} tokens · ${describeOpening(event)}`);
        doc.li.dataset.state = event.how;
      }
    });
  } catch (error) {
    setDocState(doc, `could not open: ${error.message}`);
    doc.li.dataset.state = "error";
    throw error;
  }
}

async function register(body) {
  say("");
  try {
    const doc = addDocument(await api("/v1/documents", body));
    await selectDocument(doc.summary.id);
  } catch (error) {
    say(error.message);
  }
}

function fileAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---- the document view ----

// character offsets from the server count code points; JavaScript strings count UTF-16 units
function unitIndex(text) {
  if (!/[\uD800-\uDFFF]/.test(text)) return (i) => i;
  const units = [];
  let u = 0;
  for (const ch of text) { units.push(u); u += ch.length; }
  units.push(u);
  return (i) => units[Math.min(i, units.length - 1)];
}

function renderDocument(doc, passages, steps = 0) {
  const text = doc.text, at = unitIndex(text), box = $("#doc-text");
  $("#viewer-title").textContent = doc.summary.filename;
  const anchors = doc.summary.places.map((p, i) => ({ at: at(p.start), id: `place-${i}`, where: p.where }));
  $("#places").replaceChildren(...anchors.map((a) => el("a", { href: `#${a.id}`, textContent: a.where })));
  const heaviest = Math.max(...passages.map((p) => p.weight), 1e-12);
  const marks = passages.map((p, rank) => ({ s: at(p.start), e: at(p.end), p, rank }))
    .sort((a, b) => a.s - b.s);
  const parts = [];
  let pos = 0, next = 0;
  const upTo = (limit) => {
    for (; next < anchors.length && anchors[next].at <= limit; next++) {
      const a = anchors[next], start = Math.max(pos, a.at);
      parts.push(text.slice(pos, start), el("span", { className: "place", id: a.id }));
      const marker = MARKER.exec(text.slice(start, limit));  // the reader's "[page 2]" line, shown as a label
      parts.push(el("span", { className: "place-label", textContent: marker ? marker[0] : "" }));
      pos = start + (marker ? marker[0].length : 0);
    }
    parts.push(text.slice(pos, Math.max(pos, limit)));
    pos = Math.max(pos, limit);
  };
  for (const m of marks) {
    if (m.s < pos) continue;
    upTo(m.s);
    const mark = el("mark", { textContent: text.slice(m.s, m.e), id: `focus-${m.rank + 1}`,
                              title: `#${m.rank + 1}: ${(100 * m.p.weight).toFixed(1)}% of the QR heads' attention` });
    mark.dataset.rank = m.rank + 1;
    mark.dataset.weight = m.p.weight;
    mark.style.setProperty("--w", (0.06 + 0.84 * m.p.weight / heaviest).toFixed(3));
    parts.push(mark);
    pos = m.e;
  }
  upTo(text.length);
  box.replaceChildren(...parts);
  $("#focus-caption").textContent = passages.length ? `Where DySCO looked (share of the QR heads' attention, `
    + `mean over the answer's ${steps} steps); click one to see it in the document` : "";
  $("#focus-list").replaceChildren(...passages.map((p, rank) => {
    const item = el("li", {}, el("span", { className: "where", textContent: `${p.where || "start"} · ${(100 * p.weight).toFixed(1)}% · ` }),
                    p.text.length > 90 ? p.text.slice(0, 90) + "…" : p.text);
    item.dataset.rank = rank + 1;
    item.addEventListener("click", () => jumpTo(rank + 1));
    return item;
  }));
}

function jumpTo(rank) {
  const mark = document.getElementById(`focus-${rank}`);
  if (!mark) return;
  mark.scrollIntoView({ block: "center" });
  for (const m of document.querySelectorAll("mark.flash")) m.classList.remove("flash");
  mark.classList.add("flash");
}

function showAnswer(card) {
  const doc = state.docs.get(card.dataset.doc);
  if (!doc || doc.text === null) return;
  for (const c of document.querySelectorAll(".answer.shown")) c.classList.remove("shown");
  card.classList.add("shown");
  state.current = doc;
  for (const li of document.querySelectorAll("#doc-list li")) li.classList.toggle("selected", li.dataset.id === doc.summary.id);
  renderDocument(doc, card.focus ? card.focus.passages : [], card.focus ? card.focus.steps : 0);
}

// ---- questions and answers ----

function runsFor(mode, compare) {
  const dysco = mode === "off" ? { label: "plain (DySCO off)", kind: "plain", dysco: false }
    : { label: `DySCO (${mode})`, kind: "dysco", dysco: { mode } };
  if (!compare || mode === "off") return [dysco];
  return [{ label: "plain", kind: "plain", dysco: false }, dysco];
}

async function ask(question) {
  const doc = state.current;
  const runs = runsFor($("#mode").value, $("#compare").checked);
  const answers = el("div", { className: runs.length > 1 ? "answers compare" : "answers" });
  const turn = el("div", { className: "turn" }, el("p", { className: "q" }, question + " ",
    el("span", { className: "doc", textContent: `(${doc.summary.filename})` })), answers);
  $("#turns").querySelector(".hint")?.remove();
  $("#turns").append(turn);
  const cards = runs.map((run) => {
    const card = el("div", { className: "answer" }, el("h3", { textContent: run.label }),
                    el("div", { className: "text" }), el("div", { className: "meta" }));
    Object.assign(card.dataset, { kind: run.kind, doc: doc.summary.id });
    card.addEventListener("click", () => showAnswer(card));
    answers.append(card);
    return card;
  });
  turn.scrollIntoView({ block: "end" });
  await openDocument(doc);  // another tab may have opened another document meanwhile
  for (const [i, run] of runs.entries()) await answer(cards[i], doc, question, run);
}

async function answer(card, doc, question, run) {
  const text = card.querySelector(".text"), meta = card.querySelector(".meta");
  const body = { model: "local", messages: [{ role: "user", content: question }], document: doc.summary.id,
                 dysco: run.dysco, stream: true, return_progress: true, return_focus: { top: 8 },
                 stream_options: { include_usage: true }, max_tokens: Number($("#max-tokens").value) || 160 };
  const started = performance.now();
  let first = null;
  try {
    await sse("/v1/chat/completions", body, (chunk) => {
      if (chunk.prompt_progress) {
        const p = chunk.prompt_progress;
        meta.textContent = `prompt ${p.processed}/${p.total} tokens (${p.cache} from the cache)`;
      }
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          first = first ?? performance.now();
          text.append(choice.delta.content);  // one text node per streamed piece
        }
      }
      if (chunk.dysco && "focus" in chunk.dysco) card.focus = chunk.dysco.focus;
      if (chunk.usage) {
        const u = chunk.usage;
        meta.textContent = `${u.completion_tokens} tokens · first after ${((first ?? performance.now()) - started).toFixed(0)} ms · `
          + `${u.prompt_tokens_details.cached_tokens} of ${u.prompt_tokens} prompt tokens from the cache`;
      }
    });
    card.classList.add("done");
    if (card.focus) showAnswer(card);
  } catch (error) {
    card.classList.add("error", "done");
    text.append(error.message);
  }
}

// ---- start ----

async function connect() {
  say("");
  try {
    const models = await api("/v1/models");
    const m = models.data[0];
    $("#model").textContent = `${m.id} · context ${m.meta.n_ctx} · ${m.meta.qr_heads ? "QR heads found" : "no QR heads"}`;
    for (const summary of (await api("/v1/documents")).data) addDocument(summary);
  } catch (error) {
    $("#model").textContent = "not connected";
    say(error.message);
  }
}

$("#key").value = localStorage.getItem(KEY_STORE) || "";
$("#key").addEventListener("change", () => { localStorage.setItem(KEY_STORE, $("#key").value.trim()); connect(); });
$("#file").addEventListener("change", async () => {
  const file = $("#file").files[0];
  if (file) await register({ filename: file.name, data: await fileAsBase64(file) });
  $("#file").value = "";
});
$("#by-path").addEventListener("submit", (event) => {
  event.preventDefault();
  if ($("#path").value.trim()) register({ path: $("#path").value.trim() });
});
$("#ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("#question").value.trim();
  if (!question || !state.current || state.busy) return;
  state.busy = true;
  $("#ask-button").disabled = true;
  $("#question").value = "";
  try {
    await ask(question);
  } catch (error) {
    say(error.message);
  } finally {
    state.busy = false;
    $("#ask-button").disabled = false;
  }
});
$("#question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("#ask").requestSubmit(); }
});
connect();
