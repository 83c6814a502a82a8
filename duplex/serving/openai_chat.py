"""``/v1/chat/completions`` and ``/v1/models``: the OpenAI Chat Completions API over the server's
own engine, for clients that only speak that (the ``openai`` SDK, LangChain, curl).

A completion is stateless: each request renders its messages into a fresh sequence on the shared
:class:`~duplex.engine.worker.Engine`, then decodes one token per engine call. Those calls queue on
the same device worker as every live session's, so completions and conversations share the model
fairly, token by token. Streaming is SSE (``data: {chunk}`` lines, ``data: [DONE]``).

Unsupported request fields are refused with HTTP 400 in OpenAI's error shape rather than ignored,
so a client never silently gets something other than what it asked for (``docs/openai.md``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.http11 import Request

from duplex.engine.sampling import Sampler, SamplingConfig
from duplex.engine.sequence import SequenceConfig, SharedSequence, Speaker
from duplex.engine.worker import Engine
from duplex.serving.http_front import HttpRequest, HttpResponse, json_response
from duplex.session.detok import IncrementalDetokenizer

__all__ = ["ChatCompletions", "ChatMessage", "ChatRequest", "OpenAIHttpError", "claims_openai_http", "make_openai_http",
           "parse_chat_request"]

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
_ROLES = {"system": Speaker.SYSTEM, "developer": Speaker.SYSTEM, "user": Speaker.USER, "assistant": Speaker.AGENT}
_SUPPORTED = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                        "temperature", "top_p", "stop", "seed", "n", "user", "presence_penalty",
                        "frequency_penalty", "logprobs"})
# accepted only with the value that means "off" (what duplex does anyway)
_ONLY_DEFAULT: dict[str, Any] = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}


class OpenAIHttpError(Exception):
    """An API error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> HttpResponse:
        return json_response(self.status, {"error": {"message": self.message, "type": self.kind,
                                                     "param": self.param, "code": self.code}})


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # system | user | assistant (developer is read as system)
    text: str
    type: str = "chat_message"


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingConfig
    stream: bool = False
    include_usage: bool = False
    type: str = "chat_request"


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise OpenAIHttpError(400, f"'{key}' must be a number in [{lo:g}, {hi:g}]", key, "invalid_value")
    return float(value)


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OpenAIHttpError(400, f"'{key}' must be a positive integer", key, "invalid_value")
    return value


def _message(i: int, raw: Any) -> ChatMessage:
    param = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise OpenAIHttpError(400, f"{param} must be an object", param, "invalid_value")
    role = raw.get("role")
    if role not in _ROLES:
        raise OpenAIHttpError(400, f"{param}.role {role!r} is not supported (system, developer, user, assistant)",
                              f"{param}.role", "unsupported_value")
    extra = set(raw) - {"role", "content", "name"}
    if extra:
        key = sorted(extra)[0]
        raise OpenAIHttpError(400, f"{param}.{key} is not supported by duplex", f"{param}.{key}",
                              "unsupported_parameter")
    content = raw.get("content")
    if isinstance(content, str):
        return ChatMessage("system" if role == "developer" else role, content)
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIHttpError(400, f"{param}.content[{j}]: only text parts are supported",
                                      f"{param}.content[{j}]", "unsupported_value")
            texts.append(part["text"])
        return ChatMessage("system" if role == "developer" else role, "".join(texts))
    raise OpenAIHttpError(400, f"{param}.content must be a string or a list of text parts", f"{param}.content",
                          "invalid_value")


def parse_chat_request(raw: bytes, *, default_temperature: float = 0.0,
                       default_max_tokens: int = DEFAULT_MAX_TOKENS) -> ChatRequest:
    """Validate a request body; raises :class:`OpenAIHttpError` (400) naming the offending field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise OpenAIHttpError(400, f"request body is not valid JSON: {exc}", None, "invalid_json") from exc
    if not isinstance(body, dict):
        raise OpenAIHttpError(400, "request body must be a JSON object", None, "invalid_json")
    body = {k: v for k, v in body.items() if v is not None}  # null = not given
    for key in sorted(body):
        if key not in _SUPPORTED:
            raise OpenAIHttpError(400, f"'{key}' is not supported by duplex (see docs/openai.md)", key,
                                  "unsupported_parameter")
        if key in _ONLY_DEFAULT and body[key] != _ONLY_DEFAULT[key]:
            raise OpenAIHttpError(400, f"'{key}' is only supported as {json.dumps(_ONLY_DEFAULT[key])}", key,
                                  "unsupported_value")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIHttpError(400, "'model' is required (any name; the server's model answers)", "model",
                              "missing_required_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIHttpError(400, "'messages' must be a non-empty list", "messages", "missing_required_parameter")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIHttpError(400, "'stream' must be a boolean", "stream", "invalid_value")
    options = body.get("stream_options", {})
    if "stream_options" in body and not stream:
        raise OpenAIHttpError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options",
                              "invalid_value")
    if not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool):
        raise OpenAIHttpError(400, "'stream_options' supports only {\"include_usage\": bool}", "stream_options",
                              "unsupported_parameter")
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise OpenAIHttpError(400, "'stop' must be a string or up to 4 non-empty strings", "stop", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OpenAIHttpError(400, "'seed' must be an integer", "seed", "invalid_value")
    max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        top_p = 1e-6  # OpenAI accepts 0 (= greedy-ish); keep the sampler's open interval
    sampling = SamplingConfig(temperature=default_temperature if temperature is None else temperature,
                              top_p=1.0 if top_p is None else top_p, seed=seed,
                              max_tokens=max_tokens or default_max_tokens, stop=tuple(stop))
    return ChatRequest(model, tuple(_message(i, m) for i, m in enumerate(messages)), sampling, stream,
                       bool(options.get("include_usage", False)))


@dataclass(frozen=True, slots=True)
class _Piece:
    text: str
    finish_reason: str | None = None  # set on the last piece: stop | length
    type: str = "piece"


class _StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string is never sent."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was hit)."""
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class ChatCompletions:
    """The HTTP handler for ``/v1/models`` and ``/v1/chat/completions`` on one engine."""

    def __init__(self, engine: Engine, model_id: str, *, default_temperature: float = 0.0,
                 sequence: SequenceConfig | None = None) -> None:
        self.engine = engine
        self.model_id = model_id
        self.default_temperature = default_temperature
        self.sequence = sequence or SequenceConfig()
        self.created = int(time.time())

    def model_object(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "duplex"}

    async def handle(self, request: HttpRequest) -> HttpResponse:
        try:
            if request.path in ("/v1/models", "/v1/models/"):
                self._method(request, "GET")
                return json_response(200, {"object": "list", "data": [self.model_object()]})
            if request.path.startswith("/v1/models/"):
                self._method(request, "GET")
                name = request.path[len("/v1/models/"):]
                if name != self.model_id:
                    raise OpenAIHttpError(404, f"The model '{name}' does not exist; this server has "
                                          f"'{self.model_id}'", "model", "model_not_found")
                return json_response(200, self.model_object())
            if request.path == "/v1/chat/completions":
                self._method(request, "POST")
                req = parse_chat_request(request.body, default_temperature=self.default_temperature)
                return await self.respond(req)
            raise OpenAIHttpError(404, f"no route {request.method} {request.path} (duplex serves /v1/models, "
                                  "/v1/chat/completions and the WebSocket /v1/realtime)", None, "not_found")
        except OpenAIHttpError as exc:
            return exc.response()

    @staticmethod
    def _method(request: HttpRequest, method: str) -> None:
        if request.method != method:
            raise OpenAIHttpError(405, f"{request.path} takes {method}, not {request.method}", None,
                                  "method_not_allowed")

    async def respond(self, req: ChatRequest) -> HttpResponse:
        seq, prompt_tokens = await self._prefill(req)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return HttpResponse(200, self._sse(req, seq, prompt_tokens, completion_id), "text/event-stream")
        text, finish, n = [], "stop", 0
        async for piece, n in self._generate(req, seq):
            text.append(piece.text)
            finish = piece.finish_reason or finish
        return json_response(200, {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": finish, "logprobs": None}],
            "usage": _usage(prompt_tokens, n)})

    # ---- generation -----------------------------------------------------------------------
    async def _prefill(self, req: ChatRequest) -> tuple[SharedSequence, int]:
        seq = self.engine.new_sequence(self.sequence)
        ids = [self.engine.tokenizer.encode(m.text, add_special_tokens=False) for m in req.messages]
        if sum(map(len, ids)) + 4 * len(ids) + req.sampling.max_tokens >= self.sequence.max_tokens:
            raise OpenAIHttpError(400, f"messages plus max_tokens exceed the context of {self.sequence.max_tokens} "
                                  "tokens", "messages", "context_length_exceeded")

        def render() -> int:  # worker thread
            """Few forwards: each footer shares one with the next header, and the last message's
            words, footer and the agent header go in one (``append_and_hand_over``)."""
            merge = not getattr(seq.template, "system_in_user_turn", False)
            for i, (msg, msg_ids) in enumerate(zip(req.messages, ids, strict=True)):
                speaker = _ROLES[msg.role]
                if i and merge:
                    seq.hand_over(speaker)
                else:
                    if i:
                        seq.end_turn(_ROLES[req.messages[i - 1].role])
                    seq.begin_turn(speaker)
                if i == len(ids) - 1 and msg_ids:
                    seq.append_and_hand_over(msg_ids, Speaker.AGENT)
                else:
                    seq.append(msg_ids)
            if not ids[-1]:
                seq.hand_over(Speaker.AGENT)
            return len(seq)

        return seq, await self.engine.run(render)

    async def _generate(self, req: ChatRequest, seq: SharedSequence) -> AsyncIterator[tuple[_Piece, int]]:
        """Text pieces as they decode (whole characters, stop strings held back), with the count
        of generated tokens; the last piece carries the finish reason."""
        sampler = Sampler(req.sampling)
        detok = IncrementalDetokenizer(self.engine.tokenizer)
        stops = _StopMatcher(req.sampling.stop)
        end_ids = set(seq.template.end_of_agent_turn_ids)
        for n in range(1, req.sampling.max_tokens + 1):
            token = await self.engine.run(seq.step, sampler)
            if token in end_ids:
                yield _Piece(stops.push(detok.flush())[0] + stops.flush(), "stop"), n - 1
                return
            text, hit = stops.push(detok.push(token))
            if hit:
                yield _Piece(text, "stop"), n
                return
            if text:
                yield _Piece(text), n
        yield _Piece(stops.push(detok.flush())[0] + stops.flush(), "length"), req.sampling.max_tokens

    async def _sse(self, req: ChatRequest, seq: SharedSequence, prompt_tokens: int,
                   completion_id: str) -> AsyncIterator[bytes]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None, usage: dict[str, int] | None = None,
                  choices: bool = True) -> bytes:
            obj: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": self.model_id,
                                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                "logprobs": None}] if choices else []}
            if req.include_usage:
                obj["usage"] = usage
            return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""}, None)
        n = 0
        async for piece, n in self._generate(req, seq):
            if piece.text:
                yield chunk({"content": piece.text}, None)
            if piece.finish_reason is not None:
                yield chunk({}, piece.finish_reason)
        if req.include_usage:
            yield chunk({}, None, _usage(prompt_tokens, n), choices=False)
        yield b"data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def claims_openai_http(method: str, path: str) -> bool:
    """The HTTP front takes ``/v1/...`` requests; ``/v1/realtime`` stays a WebSocket."""
    return path.startswith("/v1/") and path != "/v1/realtime"


def make_openai_http(engine: Engine, config: Any, authorize: Callable[[Request], bool]
                     ) -> tuple[Callable[[str, str], bool], Callable[[HttpRequest], Awaitable[HttpResponse]]]:
    """``(claims, handler)`` for :class:`~duplex.serving.http_front.HttpFront`: the server's auth
    (``Authorization: Bearer`` = the OpenAI API key), then chat completions on ``engine``.
    ``config``: the server's voice config (default temperature)."""
    chat = ChatCompletions(engine, engine.lm.name, default_temperature=config.session.sampling.temperature)

    async def handle(request: HttpRequest) -> HttpResponse:
        if not authorize(Request(request.target, request.headers)):
            return OpenAIHttpError(401, "missing or wrong API key (the server's --auth-token)", None,
                                   "invalid_api_key").response()
        return await chat.handle(request)

    return claims_openai_http, handle
