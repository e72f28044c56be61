"""The web dashboard (`/ui`): server-rendered pages over the same services as the API.

Sign-in takes an API key once and keeps it in an HttpOnly, SameSite=Strict cookie (never in a
URL, unreadable to page scripts; SameSite keeps other sites from posting the forms with it).
Every page acts for that key's tenant exactly as the API does: another tenant's job is as
unknown as a made-up id (a 404 page). Live updates come from the job's event stream
(Server-Sent Events) and a small JSON poll of the jobs list; no front-end build.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.service import Principal, authenticate
from app.chat import service as chat
from app.datasets import service as datasets
from app.datasets.upload import accept_dataset_upload
from app.db import in_request_session
from app.deps import SettingsDep, StorageDep
from app.downloads import stored_file_response
from app.errors import APIError
from app.jobs import service as jobs
from app.jobs.lifecycle import TERMINAL_STATUSES
from app.jobs.schemas import EventObject, JobCreate, JobObject
from app.jobs.stream import event_stream
from app.openai_compat.schemas import fine_tuned_model_name
from app.settings import Settings
from app.storage import ObjectNotFound, Storage
from grait.config import DEFAULT_BASE_MODEL
from grait.events import STAGES
from grait.methods import METHOD_NAMES

COOKIE = "grait_key"
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)


class SignInRequired(Exception):
    """No valid key in the cookie: the page answers with a redirect to the sign-in form."""


def install(app: FastAPI) -> None:
    """The dashboard's routes, its static files and its sign-in redirect."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")

    async def to_sign_in(request: Request, exc: Exception) -> RedirectResponse:
        return RedirectResponse("/ui/login", status_code=303)

    app.add_exception_handler(SignInRequired, to_sign_in)


async def _principal(request: Request, settings: SettingsDep) -> Principal:
    key = request.cookies.get(COOKIE)
    if not key:
        raise SignInRequired
    principal = await in_request_session(
        settings, lambda session: authenticate(session=session, key=key)
    )
    if principal is None:
        raise SignInRequired
    return principal


PrincipalDep = Annotated[Principal, Depends(_principal)]


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _not_found(request: Request, what: str) -> HTMLResponse:
    return _page(request, "error.html", 404, title="Not found", message=f"No such {what}.")


async def _run(settings: Settings, work: Any) -> Any:
    return await in_request_session(settings, work)


# ---- sign-in ----------------------------------------------------------------------------------


@router.get("", response_class=RedirectResponse)
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return _page(request, "login.html", error=None)


@router.post("/login", response_class=HTMLResponse, response_model=None)
async def login(
    request: Request, settings: SettingsDep, api_key: Annotated[str, Form()] = ""
) -> HTMLResponse | RedirectResponse:
    key = api_key.strip()
    principal = (
        await _run(settings, lambda session: authenticate(session=session, key=key))
        if key
        else None
    )
    if principal is None:
        return _page(request, "login.html", 401, error="That API key is unknown or revoked.")
    response = RedirectResponse("/ui/jobs", status_code=303)
    response.set_cookie(
        COOKIE,
        key,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/ui",
        max_age=12 * 3600,
    )
    return response


@router.post("/logout", response_class=RedirectResponse)
def logout() -> RedirectResponse:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


# ---- jobs -------------------------------------------------------------------------------------


def _job_rows(session: Session, tenant_id: str) -> list[dict[str, Any]]:
    rows = jobs.list_jobs(session=session, tenant_id=tenant_id, after=None, limit=100)[:100]
    return [JobObject.of(row).model_dump(mode="json") for row in rows]


def _jobs_context(session: Session, tenant_id: str) -> dict[str, Any]:
    return {
        "jobs": _job_rows(session, tenant_id),
        "datasets": _dataset_rows(session, tenant_id),
        "methods": METHOD_NAMES,
        "default_method": JobCreate.model_fields["method"].default,
        "default_base_model": DEFAULT_BASE_MODEL,
    }


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request, principal: PrincipalDep, settings: SettingsDep) -> Any:
    context = await _run(settings, lambda s: _jobs_context(s, principal.tenant_id))
    return _page(request, "jobs.html", **context, error=None, form={})


def _spec_errors(exc: ValidationError) -> str:
    """Pydantic's errors as `field: message` lines, the way the API's 422 names them."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()
    )


@router.post("/jobs", response_class=HTMLResponse, response_model=None)
async def submit(
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    storage: StorageDep,
    train_dataset: Annotated[str, Form()],
    method: Annotated[str, Form()] = "",
    base_model: Annotated[str, Form()] = "",
    spec: Annotated[str, Form()] = "",
) -> RedirectResponse | HTMLResponse:
    """The API's submit from a form: dataset, method and model, plus any other field of
    `POST /v1/jobs` as JSON. A spec that does not validate comes back with its errors."""
    form = {"train_dataset": train_dataset, "method": method, "base_model": base_model}
    error, status = None, 422
    body: JobCreate | None = None
    try:
        extra = json.loads(spec) if spec.strip() else {}
    except ValueError as exc:  # json's errors name line and column
        extra, error = None, f"more settings: {exc}"
    if extra is not None and not isinstance(extra, dict):
        error = "more settings: a JSON object, as the body of POST /v1/jobs"
    elif extra is not None:
        try:
            body = JobCreate.model_validate({**extra, **{k: v for k, v in form.items() if v}})
        except ValidationError as exc:
            error = _spec_errors(exc)
    if body is not None:
        submitted = body

        def work(session: Session) -> str:
            job, _ = jobs.submit_job(
                session=session,
                storage=storage,
                settings=settings,
                tenant_id=principal.tenant_id,
                request=submitted,
            )
            return job.id

        try:
            job_id = await _run(settings, work)
            return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)
        except APIError as exc:  # e.g. an unknown dataset (404) or the tenant's quota (429)
            error = f"{exc.param}: {exc.message}" if exc.param else exc.message
            status = exc.status
    context = await _run(settings, lambda s: _jobs_context(s, principal.tenant_id))
    form["spec"] = spec
    return _page(request, "jobs.html", status, **context, error=error, form=form)


@router.get("/jobs.json")
async def jobs_json(principal: PrincipalDep, settings: SettingsDep) -> dict[str, Any]:
    """What the jobs page polls: status, stage, percent and ETA of the newest 100 jobs."""
    rows = await _run(settings, lambda s: _job_rows(s, principal.tenant_id))
    keys = ("id", "status", "stage", "percent", "eta_seconds", "method", "created_at")
    return {"data": [{k: r[k] for k in keys} for r in rows]}


def _timeline(events: list[dict[str, Any]], stages: list[str]) -> list[dict[str, Any]]:
    """Per stage of the method: pending / running / done / skipped, with its duration."""
    state = {s: {"stage": s, "state": "pending", "seconds": None} for s in stages}
    for e in events:
        stage, kind = e.get("stage"), e.get("type")
        if stage not in state:
            continue
        if kind == "stage_started":
            state[stage].update(state="running", started=e["created_at"])
        elif kind == "stage_completed":
            started = state[stage].get("started")
            seconds = e["created_at"] - started if started is not None else None
            state[stage].update(state="done", seconds=seconds)
        elif kind == "stage_skipped" and state[stage]["state"] == "pending":
            state[stage]["state"] = "skipped"
    return list(state.values())


def _read_artifact(storage: Storage, row: Any) -> Any:
    """Blocking (an object store downloads it once into this machine's cache): run in a thread."""
    try:
        path = storage.fetch(row.storage_key)
    except ObjectNotFound:  # the page shows without it
        return None
    if row.kind == "report_json":
        return json.loads(path.read_text())
    if row.kind in ("selection", "answers"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return None


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(
    job_id: str,
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Any:
    def load(session: Session) -> dict[str, Any] | None:
        try:
            job = jobs.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
        except APIError:
            return None
        events = jobs.list_events(
            session=session, tenant_id=principal.tenant_id, job_id=job_id, after=None, limit=2000
        )
        artifacts = jobs.list_artifacts(
            session=session, tenant_id=principal.tenant_id, job_id=job_id
        )
        return {
            "job": JobObject.of(job).model_dump(mode="json"),
            "model_name": fine_tuned_model_name(job),
            "events": [EventObject.of(e).model_dump(mode="json") for e in events[:2000]],
            "artifacts": [
                {"id": a.id, "kind": a.kind, "filename": a.filename, "row": a} for a in artifacts
            ],
        }

    data = await _run(settings, load)
    if data is None:
        return _not_found(request, "job")
    report = selection = answers = None
    for artifact in data["artifacts"]:
        if artifact["kind"] == "report_json":
            report = await run_in_threadpool(_read_artifact, storage, artifact["row"])
        elif artifact["kind"] == "selection":
            selection = await run_in_threadpool(_read_artifact, storage, artifact["row"])
        elif artifact["kind"] == "answers":
            answers = await run_in_threadpool(_read_artifact, storage, artifact["row"])
    outcome = request.query_params.get("outcome", "")
    known = request.query_params.get("known", "")
    shown = [
        a
        for a in answers or []
        if (not outcome or a["tuned"]["outcome"] == outcome)
        and (not known or a["known"] == (known == "known"))
    ]
    from grait.methods import method_spec  # torch-free: the method table only

    stages = [s for s in STAGES if s in method_spec(data["job"]["method"]).stages]
    picked = sorted(
        (row for row in selection or [] if row.get("selected")), key=lambda r: r["rank"]
    )
    terms = sorted({k for row in picked for k in row} - {"id", "row", "selected", "rank", "weight"})
    return _page(
        request,
        "job.html",
        job=data["job"],
        events=data["events"],
        timeline=_timeline(data["events"], stages),
        artifacts=data["artifacts"],
        report=report,
        picked=picked[:200],
        answers=shown[:500],
        answers_total=len(answers or []),
        answers_shown=len(shown),
        has_answers=answers is not None,
        outcome=outcome,
        known=known,
        terms=terms,
        finished=data["job"]["status"] in TERMINAL_STATUSES,
        model_name=data["model_name"],
        can_chat=data["job"]["status"] == "succeeded"
        and any(a["kind"] == "adapter" for a in data["artifacts"]),
        now=int(time.time()),
    )


@router.post("/jobs/{job_id}/cancel", response_class=RedirectResponse, response_model=None)
async def cancel(
    job_id: str, request: Request, principal: PrincipalDep, settings: SettingsDep
) -> RedirectResponse | HTMLResponse:
    def work(session: Session) -> str | None:
        try:
            jobs.cancel_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
        except APIError as exc:
            return exc.message if exc.status == 409 else "not found"
        return None

    problem = await _run(settings, work)
    if problem == "not found":
        return _not_found(request, "job")
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.get("/jobs/{job_id}/events/stream")
async def stream(
    job_id: str, request: Request, principal: PrincipalDep, settings: SettingsDep
) -> Any:
    """The API's event stream for the signed-in tenant (EventSource sends the cookie)."""

    def check(session: Session) -> None:
        jobs.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)

    try:
        await _run(settings, check)
    except APIError:
        return _not_found(request, "job")
    after = request.headers.get("last-event-id")
    return StreamingResponse(
        event_stream(settings, tenant_id=principal.tenant_id, job_id=job_id, after=after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class TryIt(BaseModel):
    question: str = Field(min_length=1, max_length=4000)
    model: Literal["tuned", "base"] = "tuned"


TRY_IT_MAX_TOKENS = 64


@router.post("/jobs/{job_id}/chat", response_model=None)
async def try_it(
    job_id: str,
    body: TryIt,
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
) -> StreamingResponse | PlainTextResponse:
    """The try-it box: one question to the job's tuned model (or its base), greedy, with the
    prompt it was trained on; the answer streams back as plain text."""
    try:
        served = await _run(
            settings,
            lambda s: chat.job_model(session=s, tenant_id=principal.tenant_id, job_id=job_id),
        )
        if body.model == "base":
            served = chat.ServedModel(name=served.base_model, base_model=served.base_model)
        generation = await request.app.state.model_server.generate(
            served,
            messages=[{"role": "user", "content": body.question}],
            prompt_format="rait",
            max_new_tokens=min(TRY_IT_MAX_TOKENS, settings.chat_max_tokens),
            temperature=0.0,
            top_p=1.0,
            seed=None,
        )
    except APIError as exc:
        return PlainTextResponse(exc.message, status_code=exc.status)

    async def answer() -> AsyncIterator[str]:
        async for event in generation.events:
            if event["event"] == "delta":
                yield event["text"]
            elif event["event"] == "error":
                yield f"\n[error: {event['message']}]"

    return StreamingResponse(
        answer(),
        media_type="text/plain; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}/artifacts/{artifact_id}", response_model=None)
async def artifact(
    job_id: str,
    artifact_id: str,
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Response:
    def work(session: Session) -> Any:
        try:
            return jobs.get_artifact(
                session=session,
                tenant_id=principal.tenant_id,
                job_id=job_id,
                artifact_id=artifact_id,
            )
        except APIError:
            return None

    row = await _run(settings, work)
    if row is None:
        return _not_found(request, "artifact")
    try:
        return await run_in_threadpool(
            stored_file_response,
            storage,
            key=row.storage_key,
            filename=row.filename,
            media_type=row.content_type,
        )
    except ObjectNotFound:
        return _not_found(request, "artifact")


# ---- datasets ---------------------------------------------------------------------------------


def _dataset_rows(session: Session, tenant_id: str) -> list[dict[str, Any]]:
    rows = datasets.list_datasets(session=session, tenant_id=tenant_id, after=None, limit=100)
    return [
        {"id": d.id, "name": d.name, "format": d.format, "records": d.rows, "kind": d.kind}
        for d in rows[:100]
    ]


@router.get("/datasets", response_class=HTMLResponse)
async def datasets_page(request: Request, principal: PrincipalDep, settings: SettingsDep) -> Any:
    rows = await _run(settings, lambda s: _dataset_rows(s, principal.tenant_id))
    return _page(request, "datasets.html", datasets=rows, error=None, created=None)


@router.post("/datasets", response_class=HTMLResponse)
async def upload(
    request: Request, principal: PrincipalDep, settings: SettingsDep, storage: StorageDep
) -> Any:
    """The API's upload path; a file that does not read shows its error (file, line, field)."""
    error = created = None
    status = 201
    try:
        row, _ = await accept_dataset_upload(
            request, settings=settings, storage=storage, tenant_id=principal.tenant_id
        )
        created = row.id
    except APIError as exc:
        error, status = exc.message, exc.status
    rows = await _run(settings, lambda s: _dataset_rows(s, principal.tenant_id))
    return _page(request, "datasets.html", status, datasets=rows, error=error, created=created)
