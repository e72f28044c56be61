"""The model-serving process: answers chat turns with base models and tuned LoRA adapters.

`python -m worker.serving [--host H] [--port P]` (or started by the API on the first chat
request, see `app.chat.serving`). The API resolves a model name to a base model and an
adapter archive's storage key (tenancy checked against the job table) and posts them here,
so this process needs no database, only the service's storage, to fetch archives from: it
keeps each base model loaded once, the N most recently used adapters on top of it (one
PeftModel per base, adapters by name, `GRAIT_SERVING_MAX_ADAPTERS`), and streams the answer
as it is generated.

Protocol (local HTTP, one route): `POST /generate` with a `GenerateRequest` answers
`application/x-ndjson`, one event a line: `start` (prompt tokens), `delta` (text), then
`end` (finish reason, completion tokens) or `error` (status, message). Errors of loading
come as the first line, so the API can still answer its own client with a status code.
The standard library's threading HTTP server is enough here: one generation runs at a time
(the adapters are model state), and every other request waits for the model's lock.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tarfile
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from app.settings import Settings, get_settings
from app.storage import ObjectNotFound, Storage, get_storage
from grait.config import REFUSAL
from grait.data import QARecord

log = logging.getLogger("grait.serving")


class Turn(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class Adapter(BaseModel):
    """The job's adapter artifact, a .tar.gz of a PEFT folder: by storage key (what the API
    sends; fetched from the service's storage, `GRAIT_STORAGE_*`) or by local path."""

    id: str = Field(description="Names the adapter in the cache (the job id).")
    key: str | None = Field(None, description="Storage key of the archive.")
    archive: str | None = Field(None, description="Local path of the archive.")

    @model_validator(mode="after")
    def _one_source(self) -> Adapter:
        if (self.key is None) == (self.archive is None):
            raise ValueError("give the adapter's storage `key` or its local `archive` path")
        return self


class GenerateRequest(BaseModel):
    base_model: str = Field(description="Alias, local Hugging Face directory or hub id.")
    adapter: Adapter | None = None
    messages: list[Turn] = Field(min_length=1)
    prompt_format: Literal["rait", "raw"] = "rait"
    refusal: str = REFUSAL
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None


class ServingError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_OPTION = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$")


def as_question(text: str) -> QARecord:
    """A user turn as the record training worded: multiple choice when it ends with options
    lettered A, B, ... on their own lines (`A. Paris`), else an open-ended question."""
    lines = text.strip().splitlines()
    options: list[re.Match[str]] = []
    while len(options) < len(lines) - 1 and (match := _OPTION.match(lines[-1 - len(options)])):
        options.insert(0, match)
    letters = "".join(m.group(1) for m in options)
    if len(options) >= 2 and letters == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(options)]:
        stem = "\n".join(lines[: -len(options)]).strip()
        return QARecord(id="chat", question=stem, options=tuple(m.group(2) for m in options))
    return QARecord(id="chat", question=text.strip())


def chat_prompt(tokenizer: Any, turns: list[Turn], *, prompt_format: str, refusal: str) -> str:
    """The conversation as the model sees it.

    `rait` (default) words the last user turn as the tuned model's training prompt (the
    refusal-allowed question of `grait.prompts.question_message`, see `as_question`), so a
    question the job taught it to refuse gets the refusal; a lone user turn is then rendered
    exactly as in training (`render_prompt`). `raw` passes the turns through the chat template
    as they are.
    """
    from grait.prompts import question_message, render_prompt

    messages = [{"role": t.role, "content": t.content} for t in turns]
    if prompt_format == "rait":
        last = messages[-1]
        last["content"] = question_message(
            as_question(last["content"]), allow_refusal=True, refusal=refusal
        )
    if len(messages) == 1:
        return render_prompt(tokenizer, messages[0]["content"])
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    history = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages[:-1])
    return history + render_prompt(tokenizer, messages[-1]["content"])


class ModelPool:
    """Base models loaded once each and the most recently used adapters on them.

    Adapters are model state (which one is active), so a caller holds `lock` from `activate`
    to the end of its generation.
    """

    def __init__(
        self,
        *,
        device: str,
        max_adapters: int,
        max_base_models: int,
        storage: Storage | None = None,
    ):
        from grait.models import pick_runtime

        self.runtime = pick_runtime(device)
        self.max_adapters = max_adapters
        self.max_base_models = max_base_models
        self.storage = storage
        self.lock = threading.Lock()
        # name -> [model (a PeftModel once it has adapters), tokenizer]
        self._bases: OrderedDict[str, list[Any]] = OrderedDict()
        # (base, adapter id) -> the adapter's refusal bias (token, b), None for plain greedy
        self._adapters: OrderedDict[tuple[str, str], tuple[int, float] | None] = OrderedDict()

    def loaded(self) -> dict[str, list[str]]:
        return {base: [a for b, a in self._adapters if b == base] for base in self._bases}

    def activate(self, base_model: str, adapter: Adapter | None) -> tuple[Any, Any]:
        """The base model with `adapter` active (or with every adapter off), loading as needed."""
        entry = self._base(base_model)
        model, tokenizer = entry
        if adapter is None:
            if hasattr(model, "peft_config"):  # adapters stay loaded, switched off
                model.base_model.disable_adapter_layers()
            return model, tokenizer
        key = (base_model, adapter.id)
        if key in self._adapters:
            self._adapters.move_to_end(key)
        else:
            model, decoding = self._load_adapter(model, adapter)
            entry[0] = model
            self._adapters[key] = decoding
        model.set_adapter(adapter.id)
        model.base_model.enable_adapter_layers()
        while len(self._adapters) > self.max_adapters:
            (old_base, old_id), _ = self._adapters.popitem(last=False)
            self._bases[old_base][0].delete_adapter(old_id)
            log.info("adapter %s unloaded (least recently used)", old_id)
        return model, tokenizer

    def first_step_bias(self, base_model: str, adapter: Adapter | None) -> tuple[int, float] | None:
        """The refusal bias a loaded adapter decodes with (its `decoding.json`), if any."""
        if adapter is None:
            return None
        return self._adapters.get((base_model, adapter.id))

    def _base(self, name: str) -> list[Any]:
        if name in self._bases:
            self._bases.move_to_end(name)
            return self._bases[name]
        from grait.models import load_base_model

        started = time.monotonic()
        try:
            loaded = load_base_model(name, self.runtime, reuse=False)
        except (OSError, ValueError) as exc:
            raise ServingError(404, f"base model {name!r} could not be loaded: {exc}") from exc
        self._bases[name] = list(loaded)
        log.info("base model %s loaded in %.1fs", name, time.monotonic() - started)
        while len(self._bases) > self.max_base_models:
            old, _ = self._bases.popitem(last=False)
            for key in [k for k in self._adapters if k[0] == old]:
                del self._adapters[key]
            log.info("base model %s unloaded (least recently used)", old)
        return self._bases[name]

    def _archive(self, adapter: Adapter) -> Path:
        """The archive on this machine's disk (an object store's is downloaded once)."""
        missing = ServingError(404, f"adapter archive of {adapter.id} is missing")
        if adapter.key is None:
            archive = Path(adapter.archive or "")
            if not archive.is_file():
                raise missing
            return archive
        if self.storage is None:
            raise ServingError(500, "this model server has no storage to fetch adapters from")
        try:
            return self.storage.fetch(adapter.key)
        except ObjectNotFound:
            raise missing from None

    def _load_adapter(self, model: Any, adapter: Adapter) -> tuple[Any, tuple[int, float] | None]:
        """`model` with the adapter added (the first one wraps the base in a PeftModel), and
        the refusal bias the adapter was tuned and evaluated to decode with."""
        from peft import PeftModel

        from grait.refusal_bias import read_decoding

        archive = self._archive(adapter)
        started = time.monotonic()
        # The weights are read into memory, so the unpacked folder is only needed while loading.
        with tempfile.TemporaryDirectory(prefix="grait-adapter-") as tmp:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
            folder = next((p.parent for p in Path(tmp).rglob("adapter_config.json")), None)
            if folder is None:
                raise ServingError(
                    500, f"adapter archive of {adapter.id} has no adapter_config.json"
                )
            if isinstance(model, PeftModel):
                model.load_adapter(str(folder), adapter_name=adapter.id)
            else:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter.id)
            model.eval()
            decoding = read_decoding(folder)
        log.info("adapter %s loaded in %.2fs", adapter.id, time.monotonic() - started)
        return model, decoding


def _streamer(tokenizer: Any) -> Any:
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        """Text as it decodes, plus the generated token ids (for usage and finish reason)."""

        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.generated: list[int] = []

        def put(self, value: Any) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.generated.extend(value.reshape(-1).tolist())
            super().put(value)

    return CountingStreamer()


def generate_events(pool: ModelPool, request: GenerateRequest) -> Iterator[dict[str, Any]]:
    """The protocol's events for one request; closing the iterator stops the generation."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    from grait.generation import FirstStepBias

    stop = threading.Event()

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

    with pool.lock:
        try:
            model, tokenizer = pool.activate(request.base_model, request.adapter)
        except ServingError as exc:
            yield {"event": "error", "status": exc.status, "message": exc.message}
            return
        except Exception as exc:  # a broken adapter must not take the server down
            log.error("loading %s failed", request.adapter or request.base_model, exc_info=exc)
            yield {"event": "error", "status": 500, "message": f"loading failed: {exc}"}
            return
        prompt = chat_prompt(
            tokenizer,
            request.messages,
            prompt_format=request.prompt_format,
            refusal=request.refusal,
        )
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        yield {"event": "start", "prompt_tokens": int(ids.shape[1])}
        streamer = _streamer(tokenizer)
        processors = LogitsProcessorList()
        bias = pool.first_step_bias(request.base_model, request.adapter)
        if bias is not None:  # decode as the job's report measured (decoding.refusal_bias)
            processors.append(FirstStepBias(*bias, prompt_len=int(ids.shape[1])))
        eos = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
        sampling = request.temperature > 0
        if sampling and request.seed is not None:
            torch.manual_seed(request.seed)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    model.generate(
                        input_ids=ids.to(pool.runtime.device),
                        attention_mask=torch.ones_like(ids).to(pool.runtime.device),
                        max_new_tokens=request.max_new_tokens,
                        do_sample=sampling,
                        temperature=request.temperature if sampling else None,
                        top_p=request.top_p if sampling else None,
                        top_k=None,
                        eos_token_id=eos,
                        pad_token_id=tokenizer.pad_token_id,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
                        logits_processor=processors,
                    )
            except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="serving-generate", daemon=True)
        thread.start()
        try:
            for text in streamer:
                if text:
                    yield {"event": "delta", "text": text}
        finally:
            stop.set()  # a caller that went away stops the generation at the next token
            thread.join()
        if failure:
            log.error("generation failed", exc_info=failure[0])
            yield {"event": "error", "status": 500, "message": f"generation failed: {failure[0]}"}
            return
        generated = streamer.generated
        finished = bool(generated) and generated[-1] in eos
        yield {
            "event": "end",
            "finish_reason": "stop" if finished else "length",
            "completion_tokens": len(generated),
        }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked answers
    pool: ModelPool  # set by `make_server`

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._json(200, {"status": "ok", "loaded": self.pool.loaded()})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/generate":
            self._json(404, {"error": "not found"})
            return
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            request = GenerateRequest.model_validate_json(body)
        except (ValueError, ValidationError) as exc:
            self._json(422, {"error": str(exc)})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = generate_events(self.pool, request)
        try:
            for event in events:
                line = (json.dumps(event) + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away; generation stopped")
            self.close_connection = True
        finally:
            events.close()


def make_server(settings: Settings, host: str, port: int) -> ThreadingHTTPServer:
    pool = ModelPool(
        device=settings.serving_device,
        max_adapters=settings.serving_max_adapters,
        max_base_models=settings.serving_max_base_models,
        storage=get_storage(settings),
    )
    handler = type("BoundHandler", (Handler,), {"pool": pool})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m worker.serving", description=__doc__)
    parser.add_argument("--host", default=settings.serving_host)
    parser.add_argument("--port", type=int, default=settings.serving_port)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = make_server(settings, args.host, args.port)
    log.info("model server listening on http://%s:%s", args.host, server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
