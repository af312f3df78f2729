"""THE teacher client: any OpenAI-compatible chat endpoint, concurrent, retried, cached on disk.

    client = TeacherClient(TeacherConfig(url="http://127.0.0.1:8000/v1", model="smollm2"),
                           cache="out/teacher_cache.sqlite")
    answers = client.ask([Prompt(messages=[{"role": "user", "content": "..."}],
                                 template_sha256=sha)])        # in order; concurrently

Every stage that asks a teacher (annotation, synthesis, Orca-2 answers) goes through this client,
so all of them get the same guarantees:
  * at most `concurrency` requests in flight (a thread pool over one pooled httpx client);
  * retries with exponential backoff and jitter on 5xx, 408, timeouts, connection errors and bodies
    that are not an OpenAI chat completion; 429 waits for its Retry-After (seconds or a date), and
    makes every thread wait, since the server asked the client, not one request, to slow down;
  * every answer is committed to the cache (`teacher_cache.TeacherCache`) *before* it is returned,
    so a run killed at any point never pays for an answer twice;
  * token accounting from each answer's `usage`, in `client.usage`.
What is not retried: 401/403/404 (wrong URL, model or key: an `InputError` naming the URL) and
other 4xx (the teacher refused this prompt, e.g. longer than its context: an `Answer` with `error`,
not cached, so a rerun asks again). When retries run out the run stops with a `RunError` naming the
URL and the last failure; answers already received stay cached.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import email.utils
import os
import random
import threading
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from phi_jax.curation.teacher.cache import TeacherCache, cache_key
from phi_jax.errors import InputError, RunError

API_KEY_ENV = ("PHI_JAX_TEACHER_API_KEY", "OPENAI_API_KEY")
_log = logging.getLogger(__name__)
_MAX_RETRY_AFTER_S = 600.0


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher is and how to ask it.

    Attributes:
      url: the endpoint's base URL (`http://host:port/v1`; `/chat/completions` is added), or the
        full chat-completions URL.
      model: the `model` field sent (and part of the cache key).
      temperature, top_p, max_tokens, seed: sampling settings (part of the cache key).
      concurrency: requests in flight at once.
      timeout_s: seconds to wait for each request before retrying it.
      max_retries: retries per request after the first attempt.
      backoff_s, max_backoff_s: the first retry waits about backoff_s, doubling up to max_backoff_s.
    """

    url: str
    model: str
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"--teacher={self.url!r}: give the http(s) URL of an OpenAI-compatible "
                             "endpoint, e.g. http://127.0.0.1:8000/v1 (what `phi-jax serve` prints)")
        if not self.model:
            raise InputError("--teacher-model is empty; give the model name the endpoint serves")
        for name in ("concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"teacher {name}={getattr(self, name)}: must be >= 1")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise InputError("teacher timeout must be > 0, retries and backoff >= 0")

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")

    def sampling(self) -> dict[str, Any]:
        """The settings that change an answer (part of the cache key and the manifest)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request: chat messages, and the hash of the template they were rendered from.

    `seed`, when set, is this request's sampling seed instead of the config's: synthesis gives each
    prompt its own (derived from the run's seed), so sampled answers are reproducible without every
    request drawing the same random numbers.

    `request` holds more OpenAI / vLLM request fields (max_tokens, logprobs, top_logprobs,
    response_format, continue_final_message, ...) that override the config's; they change the
    answer, so they are part of its cache key: answers asked for differently are never mixed.
    `fallback` (optional) is the same request without fields an endpoint may refuse (e.g.
    `response_format`): on a 400 the client asks it instead, once warned, and remembers it.
    """

    messages: list[dict[str, str]]
    template_sha256: str
    seed: int | None = None
    request: dict[str, Any] = dataclasses.field(default_factory=dict)
    fallback: "Prompt | None" = None


@dataclasses.dataclass(frozen=True)
class Answer:
    """The teacher's reply. `error` is set (and `text` None) when it refused the prompt.

    `top_logprobs`: when the request asked for log-probs, the first answer token's alternatives
    as [[token text, log-prob], ...] (None when the endpoint returned none).
    """

    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None
    top_logprobs: list | None = None


class _Retry(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


class TeacherClient:
    """Ask an OpenAI-compatible endpoint; see the module docstring for the guarantees.

    Args:
      config: a `TeacherConfig`.
      cache: a `TeacherCache`, a path for one, or None (no cache: tests and throwaway runs only).
    """

    def __init__(self, config: TeacherConfig, cache: TeacherCache | str | os.PathLike | None):
        import httpx

        self.config = config
        self.cache = TeacherCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.usage: collections.Counter = collections.Counter()
        self._usage_lock = threading.Lock()
        self._pause_until = 0.0
        self._refuses_extras = False  # the endpoint answered 400 to a Prompt's extra fields
        self._random = random.Random()
        headers = {"User-Agent": "phi-jax-teacher"}
        key = next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=config.concurrency,
                              max_keepalive_connections=config.concurrency)
        self._http = httpx.Client(timeout=config.timeout_s, limits=limits, headers=headers)
        self._pool = concurrent.futures.ThreadPoolExecutor(config.concurrency,
                                                           thread_name_prefix="teacher")

    # ------------------------------------------------------------------------------------ public
    def ask(self, prompts: Sequence[Prompt], counts=None) -> list[Answer]:
        """Answers to `prompts`, in order, at most `concurrency` requests in flight.

        On a fatal error (retries exhausted, wrong URL) no new request starts, the ones in
        flight finish (and are cached), and the error is raised. `counts` (a stage's `Counts`)
        receives this call's share of `usage` as `teacher_<name>` counters, for the manifest.
        """
        before = collections.Counter(self.usage)
        stop = threading.Event()
        futures = [self._pool.submit(self._answer, p, stop) for p in prompts]
        try:
            answers = [f.result() for f in futures]
        except BaseException:
            stop.set()
            for f in futures:
                f.cancel()
            concurrent.futures.wait(futures)
            raise
        if counts is not None:
            for name, n in (collections.Counter(self.usage) - before).items():
                counts.add(f"teacher_{name}", n)
        return answers

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- requests
    def _count(self, **counts: int) -> None:
        with self._usage_lock:
            self.usage.update(counts)

    def _answer(self, prompt: Prompt, stop: threading.Event) -> Answer:
        if prompt.fallback is not None and self._refuses_extras:
            prompt = prompt.fallback
        answer = self._answer_one(prompt, stop)
        extras = set(prompt.request) - set(prompt.fallback.request) if prompt.fallback else set()
        if (answer.error is not None and "HTTP 400" in answer.error
                and any(k in answer.error for k in extras)):  # e.g. no response_format there: ask plainly
            with self._usage_lock:
                warn = not self._refuses_extras
                self._refuses_extras = True
            if warn:
                _log.warning("the teacher at %s refused a request with %s (%s); asking without them "
                             "from now on", self.config.endpoint, ", ".join(sorted(extras)), answer.error)
            return self._answer_one(prompt.fallback, stop)
        return answer

    def _answer_one(self, prompt: Prompt, stop: threading.Event) -> Answer:
        c = self.config
        sampling = c.sampling() if prompt.seed is None else {**c.sampling(), "seed": prompt.seed}
        sampling = {**sampling, **prompt.request}
        key = cache_key(template_sha256=prompt.template_sha256, model=c.model, sampling=sampling,
                        messages=prompt.messages)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self._count(cache_hits=1, cached_prompt_tokens=hit["prompt_tokens"],
                            cached_completion_tokens=hit["completion_tokens"])
                return Answer(**hit, cached=True)
        body = {"model": c.model, "messages": prompt.messages, **sampling}
        if body["seed"] is None:
            del body["seed"]
        last = ""
        for attempt in range(c.max_retries + 1):
            self._wait(stop)
            try:
                answer = self._post(body)
            except _Retry as retry:
                last = retry.reason
                if attempt == c.max_retries:
                    break
                self._count(retries=1)
                wait = retry.wait if retry.wait is not None else self._backoff(attempt)
                if retry.wait is not None:
                    self._pause_until = max(self._pause_until, time.monotonic() + wait)
                if stop.wait(wait):
                    raise RunError("stopped: another request failed") from None
                continue
            if answer.error is None and self.cache is not None:
                self.cache.put(key, c.model, {k: v for k, v in dataclasses.asdict(answer).items()
                                              if k not in ("cached", "error")})
            return answer
        where = ""
        if self.cache is not None:
            where = (f"; the {len(self.cache)} answers received so far are cached in {self.cache.path}, "
                     "so rerunning the same command resumes without asking for them again")
        raise RunError(f"the teacher at {c.endpoint} gave no usable answer after {c.max_retries + 1} "
                       f"attempts (last: {last}){where}")

    def _wait(self, stop: threading.Event) -> None:
        """Honour a Retry-After that any thread received."""
        delay = self._pause_until - time.monotonic()
        if delay > 0 and stop.wait(delay):
            raise RunError("stopped: another request failed")
        if stop.is_set():
            raise RunError("stopped: another request failed")

    def _backoff(self, attempt: int) -> float:
        c = self.config
        return min(c.max_backoff_s, c.backoff_s * 2 ** attempt) * self._random.uniform(0.5, 1.0)

    def _post(self, body: dict) -> Answer:
        import httpx

        c = self.config
        self._count(requests=1)
        try:
            response = self._http.post(c.endpoint, json=body)
        except httpx.TimeoutException:
            self._count(timeouts=1)
            raise _Retry(f"no answer within {c.timeout_s:g} s") from None
        except httpx.TransportError as e:
            self._count(connection_errors=1)
            raise _Retry(f"cannot reach it ({type(e).__name__}: {e})") from None
        status = response.status_code
        if status == 200:
            return self._parse(response)
        message = _error_message(response)
        if status == 429:
            self._count(http_429=1)
            raise _Retry(f"HTTP 429 {message}", _retry_after(response))
        if status >= 500 or status == 408:
            self._count(http_5xx=1)
            raise _Retry(f"HTTP {status} {message}", _retry_after(response))
        if status in (401, 403, 404):
            raise InputError(f"the teacher at {c.endpoint} answered HTTP {status} ({message}); check "
                             "--teacher (an OpenAI-compatible base URL such as http://127.0.0.1:8000/v1), "
                             f"--teacher-model={c.model!r} and the API key in ${API_KEY_ENV[0]}")
        self._count(rejected=1)
        return Answer(text=None, error=f"the teacher refused the prompt: HTTP {status} {message}")

    def _parse(self, response) -> Answer:
        """An OpenAI chat completion body -> Answer, or _Retry naming what is wrong with it."""
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message.content is {type(text).__name__}, not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            self._count(malformed=1)
            snippet = " ".join(response.text[:120].split())
            raise _Retry(f"a body that is not an OpenAI chat completion ({type(e).__name__}: {e}; "
                         f"body starts {snippet!r}); is --teacher an OpenAI-compatible /v1 endpoint?"
                         ) from None
        usage = data.get("usage") or {}
        top = _first_top_logprobs(choice)
        prompt_tokens = _int(usage.get("prompt_tokens"))
        completion_tokens = _int(usage.get("completion_tokens"))
        self._count(answers=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    answers_without_usage=int(not usage))
        return Answer(text=text, finish_reason=choice.get("finish_reason"), prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, top_logprobs=top)


def _first_top_logprobs(choice: dict) -> list | None:
    """The first answer token's [[text, log-prob], ...] from a chat choice's `logprobs`, or None."""
    try:
        entries = choice["logprobs"]["content"][0]["top_logprobs"]
        return [[str(e["token"]), float(e["logprob"])] for e in entries]
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _error_message(response) -> str:
    """The error text of an OpenAI-style error body, else the start of the body."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return f"({' '.join(str(error['message']).split())[:200]})"
    except (ValueError, AttributeError):
        pass
    return f"({' '.join(response.text[:120].split())!r})" if response.text else ""


def _retry_after(response) -> float | None:
    """Seconds asked for by a Retry-After header (delta-seconds or an HTTP date), capped at 10 min."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(0.0, seconds), _MAX_RETRY_AFTER_S)


def default_cache_path(output: str | os.PathLike) -> Path:
    """OUTPUT/teacher_cache.sqlite; for an output in a bucket (SQLite needs a real disk) a local
    scratch directory keyed by its URL, so a resume on this machine still pays nothing twice."""
    from phi_jax import fileio

    if fileio.is_remote(output):
        return fileio.scratch_dir(output) / "teacher_cache.sqlite"
    return Path(output) / "teacher_cache.sqlite"
