"""The HTTP layer: OpenAI's /v1/completions, /v1/chat/completions and /v1/models on Starlette.

Requests are validated (`protocol`), turned into token ids (chat through `chat.render_chat`), and
each choice is submitted to the continuous-batching `Engine` as its own request. Tokens come back on
the engine thread and are handed to the event loop with `call_soon_threadsafe`, so the loop never
blocks on JAX. Streams are server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
A client that goes away (mid-stream or while waiting for a whole answer) cancels its requests,
which frees their decode slots at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from phi_jax.chat import ChatTemplateError, render_chat
from phi_jax.errors import InputError
from phi_jax.inference import grammar, scoring
from phi_jax.inference.sampling import SamplingParams
from phi_jax.serve import protocol
from phi_jax.serve.engine import Engine, EngineStoppedError, QueueFullError, TokenEvent
from phi_jax.serve.protocol import APIError
from phi_jax.inference.detokenize import TextAssembler, TokenRecord

MAX_CHOICES = 64  # prompts x n in one request
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclasses.dataclass
class ServerConfig:
    """What the HTTP layer needs besides the engine.

    Attributes:
      model_name: the id clients pass as `model` (and /v1/models lists).
      chat_template: Jinja template; None = the tokenizer's, else `chat.DEFAULT_CHAT_TEMPLATE`.
      add_bos: prepend the BOS token to every prompt (Phi models are trained without it).
      max_body_bytes: larger request bodies are refused with 413.
      body_timeout_s: a request body not received within this many seconds is answered 408
        (a client trickling its body would otherwise hold a connection forever).
    """

    model_name: str = "phi"
    chat_template: str | None = None
    add_bos: bool = False
    max_body_bytes: int = 4 * 2**20
    body_timeout_s: float = 30.0


@dataclasses.dataclass
class _Choice:
    index: int
    handle: Any
    text: TextAssembler
    finish_reason: str | None = None


class _Generation:
    """All choices of one HTTP request: submission, the event stream, cancellation."""

    def __init__(self, server: "_Server", prompts: list[list[int]], req, max_tokens: list[int],
                 constraint: "grammar.Constraint | None" = None):
        self.server, self.prompts = server, prompts
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[_Choice] = []
        self.cancelled = False
        loop = asyncio.get_running_loop()
        base_seed = secrets.randbits(32) if req.seed is None else req.seed
        stop_ids = server.stop_token_ids
        try:
            for p, prompt in enumerate(prompts):
                for j in range(req.n):
                    index = len(self.choices)
                    params = SamplingParams(max_tokens=max_tokens[p], temperature=req.temperature,
                                            top_k=max(req.top_k, 0), top_p=req.top_p,
                                            seed=base_seed + j, stop_token_ids=stop_ids)
                    sink = self._sink(loop, index)
                    handle = server.engine.submit(prompt, params, sink, constraint)
                    self.choices.append(_Choice(index, handle, TextAssembler(server.tokenizer, req.stop)))
        except QueueFullError as e:
            self.cancel()
            raise APIError(429, f"the server is at capacity: {e}", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineStoppedError as e:
            self.cancel()
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from None
        except InputError as e:  # plan_tokens checks first; this is the engine's own word on it
            self.cancel()
            raise APIError(400, str(e), param=getattr(e, "field", None)) from None

    def _sink(self, loop, index):
        return lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    def cancel(self) -> None:
        self.cancelled = True
        for choice in self.choices:
            choice.handle.cancel()

    async def events(self) -> AsyncIterator[tuple[_Choice, str, list[TokenRecord]]]:
        """Yields (choice, new text, new token records) until every choice has finished."""
        unfinished = len(self.choices)
        while unfinished:
            index, event = await self.queue.get()
            choice: _Choice = self.choices[index]
            if choice.finish_reason is not None:
                continue
            done_before = len(choice.text.records)
            delta = self._apply(choice, event)
            if choice.finish_reason is not None:
                unfinished -= 1
            yield choice, delta, choice.text.records[done_before:]

    def _apply(self, choice: _Choice, event: TokenEvent) -> str:
        delta = ""
        if event.token is not None:
            delta = choice.text.add(event.token, event.logprob,
                                    tuple(zip(event.top_ids, event.top_logprobs)))
            if choice.text.stopped:
                choice.handle.cancel()
                choice.finish_reason = "stop"
                return delta
        if event.finish_reason == "cancelled" and self.cancelled:
            choice.finish_reason = "cancelled"
            return delta
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed for this request ({event.error}); the server "
                                "carries on", type="server_error", code="generation_failed")
        if event.finish_reason == "cancelled":
            engine = self.server.engine
            raise APIError(503, "the generation engine stopped before this request finished"
                           + (f" ({engine.error!r})" if engine.error else ""), type="server_error",
                           code="engine_unavailable")
        if event.finish_reason is not None:
            delta += choice.text.finish()
            choice.finish_reason = event.finish_reason
        return delta

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.text.records) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


class _Server:
    def __init__(self, engine: Engine, tokenizer, config: ServerConfig):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.created = int(time.time())
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else engine.model.config.eos_token_id
        self.stop_token_ids = () if eos is None else (int(eos),)
        self.chat_template = config.chat_template or getattr(tokenizer, "chat_template", None)

    # ----------------------------------------------------------------------------- helpers
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_bos=self.config.add_bos)
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]  # an empty prompt starts from BOS, as OpenAI allows ""
        return ids

    async def read(self, request: Request, schema):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise APIError(413, f"the request body ({declared} bytes) is larger than the limit of "
                                f"{self.config.max_body_bytes} bytes")
        try:
            body = await asyncio.wait_for(self._read_body(request), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body was not received within "
                                f"{self.config.body_timeout_s:g} s", code="request_timeout") from None
        if len(body) > self.config.max_body_bytes:
            raise APIError(413, f"the request body is larger than {self.config.max_body_bytes} bytes")
        req = protocol.parse_request(body, schema)
        if req.model != self.config.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self.config.model_name!r} (see GET /v1/models)", param="model",
                           code="model_not_found")
        return req

    async def _read_body(self, request: Request) -> bytes:
        """The body, read chunk by chunk and refused as soon as it passes the size limit."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.config.max_body_bytes:
                raise APIError(413, f"the request body is larger than {self.config.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def constraint(self, req) -> "grammar.Constraint | None":
        """The request's structured-output constraint, compiled for this model's tokenizer; 400
        naming the field and the reason (an unsupported schema feature, a bad regex) otherwise."""
        try:
            return grammar.compile_constraint(self.tokenizer, self.engine.model.config.vocab_size,
                                              req.response_format, req.structured_outputs)
        except grammar.ConstraintError as e:
            raise APIError(400, str(e), param=e.field) from None
        except InputError as e:
            raise APIError(400, f"structured outputs: {e}") from None

    def plan_tokens(self, prompts: list[list[int]], req, default: int | None, prompt_param: str):
        """max_tokens per prompt; 400 when a prompt (plus max_tokens) cannot fit the context."""
        context = self.engine.max_len
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} is more than {MAX_CHOICES} choices "
                                "in one request; split it", param="n")
        vocab = self.engine.model.config.vocab_size
        budget = []
        for ids in prompts:
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"{prompt_param}: token ids must be in [0, {vocab})", param=prompt_param)
            if not ids:
                raise APIError(400, f"{prompt_param}: empty, and the tokenizer has no BOS token to start "
                                    "from; give at least one token", param=prompt_param)
            if len(ids) >= context:
                raise APIError(400, f"this model's maximum context length is {context} tokens, but the "
                                    f"{prompt_param} has {len(ids)}; shorten it", param=prompt_param,
                               code="context_length_exceeded")
            room = context - len(ids)
            if req.max_tokens is not None and req.max_tokens > room:
                raise APIError(400, f"max_tokens: this model's maximum context length is {context} tokens; "
                                    f"{len(ids)} in the {prompt_param} + {req.max_tokens} requested is "
                                    f"more; lower max_tokens to at most {room}", param="max_tokens",
                               code="context_length_exceeded")
            budget.append(req.max_tokens or min(room, default or room))
        return budget

    def logprobs_completion(self, records: list[TokenRecord], top: int) -> dict:
        def alternatives(record):  # keyed by text as OpenAI does; on a clash the likelier id wins
            out: dict[str, float] = {}
            for i, lp in record.top[:top]:
                out.setdefault(self.token_text(i), lp)
            return out

        return {"tokens": [self.token_text(r.token_id) for r in records],
                "token_logprobs": [r.logprob for r in records],
                "top_logprobs": [alternatives(r) for r in records],
                "text_offset": [r.offset for r in records]}

    def logprobs_chat(self, records: list[TokenRecord], top: int) -> dict:
        def entry(token_id, logprob):
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [dict(entry(r.token_id, r.logprob),
                                 top_logprobs=[entry(i, lp) for i, lp in r.top[:top]])
                            for r in records]}

    # ---------------------------------------------------------------------------- endpoints
    async def health(self, request: Request) -> Response:
        engine = self.engine
        body = {"status": "ok" if engine.healthy else "unavailable", "model": self.config.model_name,
                "slots": engine.num_slots, "active": engine.num_active, "waiting": engine.num_waiting,
                "max_len": engine.max_len}
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

    async def metrics(self, request: Request) -> Response:
        """Prometheus' text format (what vLLM's /metrics speaks): the engine's counters, among them
        prefill tokens computed vs reused and the prefix cache's hit rate."""
        lines = []
        for key, value in self.engine.metrics().items():
            kind = "gauge" if key.startswith(("requests_running", "requests_waiting",
                                              "requests_prefilling", "prefix_cache_hit_rate",
                                              "prefix_cache_cached", "prefix_cache_capacity")) else "counter"
            name = f"phi_jax_{key}" + ("_total" if kind == "counter" else "")
            lines += [f"# TYPE {name} {kind}", f"{name} {value:g}" if isinstance(value, float)
                      else f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created,
                "owned_by": "phi_jax", "max_model_len": self.engine.max_len}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model"] != self.config.model_name:
            raise APIError(404, f"the model {request.path_params['model']!r} does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def echo_prompt(self, prompt: str | list[int], ids: list[int], top: int | None) -> dict:
        """The echoed prompt of a completion: its text and (with logprobs) every prompt token's
        log-probability from `inference.scoring` (the first token has none, as in OpenAI's API)."""
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
        if top is None:
            return {"text": text, "logprobs": None}
        loop = asyncio.get_running_loop()
        lps, top_ids, top_lps = await loop.run_in_executor(
            None, lambda: scoring.token_logprobs(self.engine.model, self.engine.variables, ids, top))
        records = [TokenRecord(ids[0], 0, None, ())]
        records += [TokenRecord(t, len(self.tokenizer.decode(ids[:i + 1])), lp, tuple(zip(ti, tl)))
                    for i, (t, lp, ti, tl) in enumerate(zip(ids[1:], lps, top_ids, top_lps))]
        return {"text": text, "logprobs": self.logprobs_completion(records, top)}

    def _with_echo(self, echo: dict | None, body: dict) -> dict:
        """Prepend an echoed prompt (text, logprobs with shifted offsets) to a choice's body."""
        if echo is None:
            return body
        body = dict(body, text=echo["text"] + body["text"])
        if echo["logprobs"] is not None and body["logprobs"] is not None:
            shift = len(echo["text"])
            lp = body["logprobs"]
            body["logprobs"] = {key: echo["logprobs"][key] + ([o + shift for o in lp[key]]
                                                              if key == "text_offset" else lp[key])
                                for key in lp}
        return body

    async def completions(self, request: Request) -> Response:
        req = await self.read(request, protocol.CompletionRequest)
        prompts = [self.encode(p) if isinstance(p, str) else p for p in req.prompt]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created,
                "model": self.config.model_name}
        echoes = [None] * len(prompts)
        if req.echo:
            self.plan_tokens(prompts, req.model_copy(update={"max_tokens": None}), 1, "prompt")
            echoes = [await self.echo_prompt(p, ids, req.logprobs) for p, ids in zip(req.prompt, prompts)]
        if req.max_tokens == 0:  # scoring only: the prompt, echoed, is the whole answer
            choices = [self._with_echo(echoes[p], {"index": p * req.n + j, "text": "",
                                                   "logprobs": echoes[p]["logprobs"] and
                                                   {k: [] for k in echoes[p]["logprobs"]},
                                                   "finish_reason": "length"})
                       for p in range(len(prompts)) for j in range(req.n)]
            tokens = sum(len(p) for p in prompts)
            return JSONResponse(dict(head, choices=choices, usage={
                "prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}))
        budget = self.plan_tokens(prompts, req, DEFAULT_COMPLETION_TOKENS, "prompt")
        gen = _Generation(self, prompts, req, budget, self.constraint(req))

        def choice_body(choice, text, records, echo=None):
            lp = None if req.logprobs is None else self.logprobs_completion(records, req.logprobs)
            return self._with_echo(echo, {"index": choice.index, "text": text, "logprobs": lp,
                                          "finish_reason": choice.finish_reason})

        if req.stream:
            async def chunks():
                echoed = set()
                async for choice, delta, records in gen.events():
                    echo = None
                    if req.echo and choice.index not in echoed:
                        echo, _ = echoes[choice.index // req.n], echoed.add(choice.index)
                    if echo or delta or choice.finish_reason or (records and req.logprobs is not None):
                        yield dict(head, choices=[choice_body(choice, delta, records, echo)])
            return _sse(request, gen, chunks(), head, req)
        await _collect(request, gen)
        choices = [choice_body(c, c.text.text, c.text.records, echoes[c.index // req.n])
                   for c in gen.choices]
        return JSONResponse(dict(head, choices=choices, usage=gen.usage()))

    async def chat_completions(self, request: Request) -> Response:
        req = await self.read(request, protocol.ChatCompletionRequest)
        tok = self.tokenizer
        special = tok.special_tokens_map  # bos/eos/unk/pad strings, as transformers passes them
        messages = [{"role": m.role, "content": m.content} | ({"name": m.name} if m.name else {})
                    for m in req.messages]
        try:
            text = render_chat(messages, self.chat_template, **special,
                               add_generation_prompt=req.add_generation_prompt
                               and not req.continue_final_message)
        except ChatTemplateError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        if req.continue_final_message:
            text = _continue(text, messages[-1]["content"])
        prompts = [self.encode(text)]
        budget = self.plan_tokens(prompts, req, None, "messages")
        gen = _Generation(self, prompts, req, budget, self.constraint(req))
        top = (req.top_logprobs or 0) if req.logprobs else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if req.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": self.config.model_name}

            async def chunks():
                for c in gen.choices:
                    yield dict(head, choices=[{"index": c.index, "logprobs": None, "finish_reason": None,
                                               "delta": {"role": "assistant", "content": ""}}])
                async for choice, delta, records in gen.events():
                    if delta or choice.finish_reason or (records and top is not None):
                        body = {"index": choice.index, "delta": {"content": delta} if delta else {},
                                "logprobs": None if top is None else self.logprobs_chat(records, top),
                                "finish_reason": choice.finish_reason}
                        yield dict(head, choices=[body])
            return _sse(request, gen, chunks(), head, req)
        await _collect(request, gen)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                    "logprobs": None if top is None else self.logprobs_chat(c.text.records, top),
                    "finish_reason": c.finish_reason} for c in gen.choices]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                             "model": self.config.model_name, "choices": choices,
                             "usage": gen.usage()})


def _continue(rendered: str, final: str) -> str:
    """The rendered chat cut right after the last message's content, so the answer continues it
    (what transformers' and vLLM's `continue_final_message` do)."""
    at = rendered.rfind(final) if final else -1
    if at < 0:
        raise APIError(400, "continue_final_message: the chat template does not show the last message's "
                            "content verbatim, so the answer cannot continue it", param="messages")
    return rendered[:at + len(final)]


async def _collect(request: Request, gen: _Generation) -> None:
    """Run a request to the end; a client that hangs up meanwhile cancels it."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gen.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for _ in gen.events():
            if watcher.done():
                break
    except BaseException:
        gen.cancel()
        raise
    finally:
        watcher.cancel()
    if watcher.done() and not watcher.cancelled():
        raise APIError(499, "the client closed the connection")


def _sse(request: Request, gen: _Generation, chunks, head: dict, req) -> StreamingResponse:
    """Server-sent events: one `data: {json}` per chunk, usage if asked for, then `data: [DONE]`."""
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            if req.stream_options is not None and req.stream_options.include_usage:
                yield f"data: {json.dumps(dict(head, choices=[], usage=gen.usage()))}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            gen.cancel()  # no-op for finished choices; frees the slots of a client that left
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                 code=kind).body(), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug still answers in OpenAI's format; Starlette re-raises it afterwards, so uvicorn logs it."""
    return JSONResponse(APIError(500, f"internal server error: {exc!r}", type="server_error").body(),
                        status_code=500)


def create_app(engine: Engine, tokenizer, config: ServerConfig | None = None) -> Starlette:
    """The ASGI app. The engine is started on startup (if it is not running) and stopped on shutdown."""
    if tokenizer is None:
        raise ValueError("serving needs a tokenizer; put tokenizer.json (or tokenizer.model) beside "
                         "the checkpoint")
    server = _Server(engine, tokenizer, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        started = not engine.healthy
        if started:
            engine.start()
        yield
        if started:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        APIError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.server = server
    return app
