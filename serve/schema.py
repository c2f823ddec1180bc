"""Request bodies in OpenAI's shapes, and the one error type every endpoint answers with.

Fields a client may send that change nothing here (``user``, ``stream_options`` beyond usage,
``frequency_penalty`` 0...) are accepted and ignored, as OpenAI's own server does; a field that
asks for something we cannot do (``n`` > 1, a penalty we do not implement) is a 400 that says so.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 16
MAX_PROMPTS = 256
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error the client caused (or a busy server): its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Sampling fields shared by both endpoints; ``strict`` so "0.5" is not a number."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, object] | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    """llama-server's and vLLM's extension: decode all of max_tokens (benchmarks want a fixed length)."""

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        return [s for s in stops if s]

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0:
                raise ApiError(400, f"{name} is not supported (repetition_penalty is)", param=name)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        """The message as plain text; only text parts can be read by a text model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"message content of type {part.type!r} is not supported (text only)",
                               param="messages")
        return "".join(part.text or "" for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation for the chat template; ``developer`` is OpenAI's new name for ``system``."""
        if self.logprobs:
            raise ApiError(400, "logprobs are supported on /v1/completions only", param="logprobs")
        out = []
        for m in self.messages:
            out.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
        return out


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise ApiError(400, "only best_of=1 is supported", param="best_of")

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: text, or token ids (lm-eval sends ids, batched as a list of lists)."""
        p = self.prompt
        if isinstance(p, str):
            items: list[Union[str, list[int]]] = [p]
        elif p and isinstance(p[0], int):
            items = [list(p)]
        else:
            items = list(p)  # type: ignore[arg-type]  # a list of prompts, as the branches above leave it
        if not items:
            raise ApiError(400, "prompt is empty", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
        return items
