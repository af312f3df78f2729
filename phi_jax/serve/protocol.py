"""OpenAI request schemas, their validation, and OpenAI-style error bodies.

Validation is strict (no "5" -> 5 coercion, no booleans as numbers) so that a client bug shows up
as a 400 naming the field, the way api.openai.com answers, instead of as a surprising generation.
Unknown fields are ignored, as other OpenAI-compatible servers do, so newer clients keep working;
known-but-unsupported features (suffix, penalties) are refused explicitly rather than ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions get the same here
MAX_NESTING = 32  # the deepest request OpenAI's schemas need is ~5 levels
_TOO_DEEP = object()


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # vLLM's extension; -1 and 0 both mean "off"
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: Any = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs (choice / regex /
    # json / grammar); checked and compiled by `inference.grammar` (a bad one answers 400).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if (not isinstance(value, list) or not all(isinstance(s, str) and s for s in value)
                or len(value) > MAX_STOP_SEQUENCES):
            raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} "
                             "non-empty strings")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0.0:
            raise ValueError("is not supported by this server; leave it at 0")
        return value


class CompletionRequest(_SamplingRequest):
    max_tokens: int | None = Field(None, ge=0)
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_forms(cls, value):
        """Normalise the four OpenAI prompt forms to a list of (str | list[int])."""
        def ids(x):
            return isinstance(x, list) and x and all(type(t) is int for t in x)

        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(type(t) is int for t in value):
                return [value]
            if all(isinstance(p, str) or ids(p) for p in value):
                return value
        raise ValueError("must be a string, a non-empty list of strings, a non-empty list of token ids, "
                         "or a list of non-empty lists of token ids")

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self):
        """max_tokens 0 asks only for the prompt's log-probs (echo), as OpenAI allows."""
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo=true (to score the prompt)")
        return self

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("is not supported by this server (no fill-in-the-middle)")
        return value


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_content(cls, value):
        """A string, or a list of {"type": "text", "text": ...} parts (joined); images are refused."""
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in value):
            return "".join(p["text"] for p in value)
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts '
                         "(this model reads text only)")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's extensions: end the prompt inside the last (assistant) message, so the answer
    # continues it (a judge's "Score: " line), instead of opening a new assistant turn.
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _continue_an_assistant_message(self):
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message: the last message must be the assistant's "
                             "(the start of the answer to continue)")
        return self

    @model_validator(mode="after")
    def _merge_max_tokens(self):
        if self.max_completion_tokens is not None:  # the newer name wins, as in OpenAI's API
            self.max_tokens = self.max_completion_tokens
        return self


def _param(loc: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _nesting(value: Any) -> int:
    """Depth of nested lists/dicts, found iteratively (a deep body must not recurse here either)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if deepest > MAX_NESTING:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_request(body: bytes, schema: type[BaseModel]) -> Any:
    """JSON bytes -> a validated request; raises APIError(400) naming the offending field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:
        data = _TOO_DEEP
    if data is _TOO_DEEP or _nesting(data) > MAX_NESTING:
        raise APIError(400, f"the request body is nested more than {MAX_NESTING} levels deep; no "
                            "OpenAI request needs that")
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        param = _param(error["loc"])
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            msg = "is required"
        if not param:  # a check across fields: its message names them
            raise APIError(400, msg, param=msg.split(":")[0] if ":" in msg else None) from None
        raise APIError(400, f"{param}: {msg}", param=param) from None
