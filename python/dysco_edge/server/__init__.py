"""`dysco-edge serve`: an OpenAI-compatible HTTP server over one `dysco_edge.api.Model`.

settings.py  the server's options (validated at construction)
schemas.py   request bodies and what they mean for `Model.generate` (DySCO per request)
responses.py OpenAI's response, chunk and error shapes
queue.py     one generation at a time on the model: a bounded queue and its worker thread
app.py       the FastAPI routes
documents.py documents registered by path or upload, opened from the KV cache, put into chats
focus.py     the dysco.focus extension: where an answer looked, as passages of the request's texts
page.py      the document-QA page at / (static/: plain HTML, CSS and JS) and the /v1/documents routes
cli.py       the `serve` verb

Only cli.py is imported by the command line; FastAPI, uvicorn and sse-starlette (the
`server` extra) load when the server starts.
"""
