"""`POST /v1/chat/completions`: OpenAI's chat route, answered by the model-serving process.

The model name is resolved here (tenancy and job state from the database, `app.chat.service`);
the serving process gets paths, generates, and streams text back, which this route hands on
as one `chat.completion` or as `chat.completion.chunk` Server-Sent Events ending with
`data: [DONE]`, the shapes the official `openai` client reads.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from app.chat import service
from app.chat.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatCompletionMessage,
    Choice,
    ChunkChoice,
    Usage,
)
from app.chat.serving import Generation, ModelServer, unavailable
from app.db import in_request_session
from app.deps import REQUIRE_KEY, PrincipalDep, SettingsDep
from app.openai_compat.errors import OPENAI_ERROR_RESPONSES, OpenAIRoute

router = APIRouter(
    prefix="/v1",
    route_class=OpenAIRoute,
    responses={
        **OPENAI_ERROR_RESPONSES,
        503: {"description": "The model server is starting, unreachable or could not load it."},
    },
    dependencies=[REQUIRE_KEY],
)


def model_server(request: Request) -> ModelServer:
    return request.app.state.model_server


ModelServerDep = Annotated[ModelServer, Depends(model_server)]


async def start_generation(
    *,
    server: ModelServer,
    served: service.ServedModel,
    body: ChatCompletionCreate,
    max_tokens_cap: int,
) -> Generation:
    wanted = body.max_completion_tokens or body.max_tokens or max_tokens_cap
    return await server.generate(
        served,
        messages=[{"role": m.role, "content": m.text} for m in body.messages],
        prompt_format=body.prompt_format,
        max_new_tokens=min(wanted, max_tokens_cap),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
    )


def _sse(chunk: ChatCompletionChunk) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


async def _chunks(
    generation: Generation, *, completion_id: str, created: int, model: str, usage: bool
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: Any = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
        )

    yield _sse(chunk({"role": "assistant", "content": ""}))
    async for event in generation.events:
        if event["event"] == "delta":
            yield _sse(chunk({"content": event["text"]}))
        elif event["event"] == "end":
            yield _sse(chunk({}, event["finish_reason"]))
            if usage:
                total = generation.prompt_tokens + event["completion_tokens"]
                final = ChatCompletionChunk(
                    id=completion_id,
                    created=created,
                    model=model,
                    choices=[],
                    usage=Usage(
                        prompt_tokens=generation.prompt_tokens,
                        completion_tokens=event["completion_tokens"],
                        total_tokens=total,
                    ),
                )
                yield _sse(final)
        elif event["event"] == "error":  # the client raises openai.APIError on this
            error = {"message": event["message"], "type": "server_error", "code": "model_error"}
            yield f"data: {json.dumps({'error': error})}\n\n"
    yield "data: [DONE]\n\n"


@router.post(
    "/chat/completions",
    tags=["openai: chat"],
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(
    body: ChatCompletionCreate,
    principal: PrincipalDep,
    settings: SettingsDep,
    server: ModelServerDep,
) -> Any:
    """A tuned job's `fine_tuned_model` or a base model answers; `stream: true` sends
    `chat.completion.chunk` events. Greedy with `temperature: 0`."""
    served = await in_request_session(
        settings,
        lambda session: service.resolve_model(
            session=session, tenant_id=principal.tenant_id, model=body.model
        ),
    )
    # No database session is held from here on: a generation can take a while.
    generation = await start_generation(
        server=server, served=served, body=body, max_tokens_cap=settings.chat_max_tokens
    )
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _chunks(
                generation,
                completion_id=completion_id,
                created=created,
                model=body.model,
                usage=include_usage,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text: list[str] = []
    end: dict[str, Any] = {}
    async for event in generation.events:
        if event["event"] == "delta":
            text.append(event["text"])
        elif event["event"] == "end":
            end = event
        elif event["event"] == "error":
            raise unavailable(event["message"])
    completion_tokens = end.get("completion_tokens", 0)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[
            Choice(
                message=ChatCompletionMessage(content="".join(text).strip()),
                finish_reason=end.get("finish_reason", "length"),
            )
        ],
        usage=Usage(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=generation.prompt_tokens + completion_tokens,
        ),
    )
