"""OpenAI's chat completion shapes: the request we take, the completion and its stream chunks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name` and the like change nothing here

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(
        description="Text, or OpenAI's content parts of type `text` (no images or audio)."
    )

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionCreate(BaseModel):
    """The part of OpenAI's request a LoRA on a small local model can honour; other fields
    (tools, response_format, logprobs, ...) are refused by name rather than ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="A succeeded job's `fine_tuned_model`, or a base model id from GET /v1/models."
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of the next.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Default and upper bound: the server's GRAIT_CHAT_MAX_TOKENS."
    )
    temperature: float | None = Field(
        None, ge=0, le=2, description="0 = greedy (as the job's evaluation); default 1."
    )
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: Literal[1] | None = Field(None, description="One choice only.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    prompt_format: Literal["rait", "raw"] = Field(
        "rait",
        description="grait extension. `rait`: the last user turn is worded as the tuned model's "
        "training prompt (an open-ended question, refusal allowed), so what the job taught it "
        "to refuse gets the refusal. `raw`: the turns go to the chat template as they are.",
    )

    @field_validator("messages")
    @classmethod
    def _ends_with_a_user_turn(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if value[-1].role != "user":
            raise ValueError("the last message must be the user's (the turn to answer)")
        return value


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, Any]
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: None = None
