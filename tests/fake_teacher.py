"""A fake OpenAI-compatible teacher for fault injection: stdlib http.server in a thread.

The document is read back out of the prompt (between the built-in rubrics' <code>/<extract> tags,
else the whole message), so a test decides per document what the teacher does on each attempt:

    teacher = FakeTeacher(score_of=lambda doc: len(doc) % 6,          # None: free text, no score
                          faults=lambda doc, attempt: "500" if attempt == 0 else None)
    with teacher:  ... teacher.url ...; teacher.answered[doc] counts the valid answers served

`answer_of(doc)` instead of `score_of` gives the whole answer text (synthesis: an exercise or a
textbook section chosen from the prompt).

A request for log-probs that continues the assistant's message (logprobs scoring) gets one token
and its `top_logprobs`: `logprobs_of(doc)` -> [(token, logprob), ...] when given, else all the mass
on the score the answer would have written (a non-score token when it has none). `logprobs=False`
plays an endpoint that returns no log-probs (it answers as for a free-text request);
`refuse_fields=("response_format",)` one that answers 400 naming such a field, as OpenAI does.

Faults: "500", "429" (with Retry-After: `retry_after`), "stall" (nothing for `stall_s`, past the
client's timeout), "malformed" (truncated JSON), "shape" (JSON that is not a chat completion),
"400" (a refusal), "404". `hang_after(n)` makes every request after the n-th valid answer block
until `release()`, counting them in `hung`, so a test can kill the client while every one of its
threads is waiting on the teacher (none between receiving an answer and caching it).
"""

from __future__ import annotations

import collections
import http.server
import json
import os
import re
import signal
import threading
import time
from typing import Callable

_DOC = re.compile(r"<(code|extract)>\n(.*)\n</\1>", re.S)


def document_of(prompt: str) -> str:
    found = _DOC.search(prompt)
    return found.group(2) if found else prompt


def kill_when_hung(teacher: "FakeTeacher", proc, threads: int, limit_s: float = 120.0) -> None:
    """SIGKILL `proc`'s process group once `threads` of its requests hang on the teacher.

    With every client thread waiting on the teacher, none is between receiving an answer and
    caching it, so what the kill loses is exactly what was never answered.
    """
    deadline = time.monotonic() + limit_s
    while teacher.hung < threads:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the client never reached the hang"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class FakeTeacher:
    def __init__(self, score_of: Callable[[str], int | None] | None = None,
                 faults: Callable[[str, int], str | None] | None = None, *, retry_after: str = "0",
                 stall_s: float = 1.5, delay_s: float = 0.0, answer_of: Callable[[str], str] | None = None,
                 logprobs_of: Callable[[str], list] | None = None, logprobs: bool = True,
                 refuse_fields: tuple[str, ...] = ()):
        self.score_of, self.faults = score_of, faults or (lambda doc, attempt: None)
        self.answer_of, self.logprobs_of, self.logprobs = answer_of, logprobs_of, logprobs
        self.bodies: list[dict] = []  # every request body received
        self.refuse_fields = refuse_fields  # 400 naming the field, as OpenAI answers unknown ones
        self.seeds: dict[str, int | None] = {}  # the sampling seed each document was last asked with
        self.retry_after, self.stall_s, self.delay_s = retry_after, stall_s, delay_s
        self.lock = threading.Lock()
        self.attempts: collections.Counter = collections.Counter()
        self.answered: collections.Counter = collections.Counter()
        self.arrivals: list[tuple[float, str, str]] = []  # (arrival time, doc, what it got)
        self.in_flight = self.max_in_flight = 0
        self.hung = 0
        self._hang_after: int | None = None
        self._release = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def hang_after(self, answers: int) -> None:
        self._hang_after = answers

    def release(self) -> None:
        self._release.set()

    def __enter__(self) -> "FakeTeacher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    # --------------------------------------------------------------------------------------------
    def _decide(self, doc: str) -> tuple[str | None, int]:
        with self.lock:
            attempt = self.attempts[doc]
            self.attempts[doc] += 1
            hang = self._hang_after is not None and sum(self.answered.values()) >= self._hang_after
            if hang:
                self.hung += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = "hang" if hang else self.faults(doc, attempt)
            self.arrivals.append((time.monotonic(), doc, fault or "answer"))
        return fault, attempt

    def _handler(self):
        teacher = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None,
                      content_type: str = "application/json"):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with teacher.lock:
                    teacher.bodies.append(request)
                user = [m["content"] for m in request["messages"] if m["role"] == "user"]
                doc = document_of(user[-1] if user else request["messages"][-1]["content"])
                teacher.seeds[doc] = request.get("seed")
                fault, _ = teacher._decide(doc)
                try:
                    self._respond(request, doc, fault)
                finally:
                    with teacher.lock:
                        teacher.in_flight -= 1

            def _respond(self, request, doc, fault):
                error = lambda msg: json.dumps({"error": {"message": msg, "type": "x"}}).encode()  # noqa: E731
                if fault == "hang":
                    teacher._release.wait(30)
                    return self._send(503, error("released"))
                if fault == "stall":  # the client has given up by then; nothing usable follows
                    teacher._release.wait(teacher.stall_s)
                    return self._send(503, error("stalled"))
                if teacher.delay_s:
                    time.sleep(teacher.delay_s)
                refused = [f for f in teacher.refuse_fields if f in request]
                if refused:
                    return self._send(400, error(f"Unrecognized request argument supplied: {refused[0]}"))
                if fault == "500":
                    return self._send(500, error("internal error"))
                if fault == "429":
                    return self._send(429, error("slow down"), {"Retry-After": teacher.retry_after})
                if fault in ("400", "404"):
                    return self._send(int(fault), error(f"fake {fault}"))
                if fault == "malformed":
                    return self._send(200, b'{"choices": [{"message": {"content": "Educ')
                if fault == "shape":
                    return self._send(200, json.dumps({"result": "ok"}).encode())
                if teacher.answer_of is not None:
                    text = teacher.answer_of(doc)
                else:
                    score = None if teacher.score_of is None else teacher.score_of(doc)
                    text = ("A fine file, I suppose." if score is None
                            else f"Some reasons.\nEducational score: {score}")
                completion = 5 if teacher.answer_of is None else len(text.split())
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if teacher.logprobs and request.get("top_logprobs") and request.get("continue_final_message"):
                    if teacher.logprobs_of is not None:
                        top = list(teacher.logprobs_of(doc))
                    else:
                        found = re.findall(r"Educational score: (\d)", text)
                        top = [(found[-1], 0.0)] if found else [("A", 0.0)]
                    top = top[:request["top_logprobs"]]
                    entry = lambda t, lp: {"token": t, "logprob": lp, "bytes": list(t.encode())}  # noqa: E731
                    text, completion = top[0][0], 1
                    choice = {"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "length",
                              "logprobs": {"content": [dict(entry(*top[0]),
                                                            top_logprobs=[entry(t, lp) for t, lp in top])]}}
                body = {"id": "x", "object": "chat.completion", "model": request["model"],
                        "choices": [choice],
                        "usage": {"prompt_tokens": len(doc.split()) + 10, "completion_tokens": completion,
                                  "total_tokens": len(doc.split()) + 10 + completion}}
                with teacher.lock:
                    teacher.answered[doc] += 1
                self._send(200, json.dumps(body).encode())

        return Handler

