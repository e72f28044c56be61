"""The official `openai` client against the one-command mode: SQLite, embedded queue and worker."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from .conftest import TERMINAL, printed_api_key, start_embedded_api, wait_for
from .test_embedded import processes_in
from .test_openai_client import chat_lines

pytestmark = pytest.mark.timeout(240)


def test_supervised_job_on_chat_files_with_sqlite_and_the_embedded_worker(
    tmp_path: Path, tiny_model: Path, logs_dir: Path
) -> None:
    from grait.testing import tiny_hyperparameters

    (tmp_path / "train.jsonl").write_text(chat_lines(10, 16), encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text(chat_lines(40, 4), encoding="utf-8")
    hyper = tiny_hyperparameters()
    hyper["evaluation"]["eval_base_refuse_prompt"] = False
    api, base = start_embedded_api(
        tmp_path, logs_dir, name="openai-embedded", GRAIT_BROKER_POLLING_INTERVAL="0.1"
    )
    try:
        # First start with no key: `serve` made one for tenant `default` and printed it once.
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key=printed_api_key(api.log()))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="gk_wrong", max_retries=0).files.list()
        train, valid = (
            oai.files.create(file=(tmp_path / name).open("rb"), purpose="fine-tune").id
            for name in ("train.jsonl", "valid.jsonl")
        )
        job = oai.fine_tuning.jobs.create(
            model=str(tiny_model),
            training_file=train,
            validation_file=valid,
            method={"type": "supervised", "supervised": {"hyperparameters": hyper}},  # type: ignore[arg-type]
        )
        second = oai.fine_tuning.jobs.create(model=str(tiny_model), training_file=train)
        # One worker slot: the second job is still queued, so its cancel is immediate.
        assert oai.fine_tuning.jobs.cancel(second.id).status == "cancelled"

        done = wait_for(
            lambda: (j := oai.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j,
            timeout=180,
            interval=1.0,
            what=f"job {job.id} to finish",
        )

        assert done.status == "succeeded", done.error
        assert done.method.type == "supervised" and done.fine_tuned_model.endswith(f"::{job.id}")
        assert done.trained_tokens and done.trained_tokens > 0
        stages = [c.stage for c in oai.fine_tuning.jobs.checkpoints.list(job.id)]
        assert stages == ["evaluation", "training"]
        assert [j.id for j in oai.fine_tuning.jobs.list(limit=1)][:2] == [second.id, job.id]
        kinds = {oai.files.retrieve(i).kind: i for i in done.result_files}
        assert oai.files.content(kinds["adapter"]).content[:2] == b"\x1f\x8b"  # gzip
        assert oai.files.content(kinds["report_md"]).text.strip()
        with pytest.raises(openai.NotFoundError):
            oai.fine_tuning.jobs.retrieve("job-unknown")
        # Chat: the API starts its model-serving process on first use...
        assert len(processes_in(tmp_path)) == 2  # the API and its worker
        answer = oai.chat.completions.create(
            model=done.fine_tuned_model,
            messages=[{"role": "user", "content": "Who wrote Hamlet?"}],
            max_tokens=3,
            temperature=0,
        )
        assert answer.model == done.fine_tuned_model and answer.usage.completion_tokens >= 1
        assert len(processes_in(tmp_path)) == 3
        oai.close()
    finally:
        api.stop()
    # ... and stops it at shutdown.
    wait_for(lambda: not processes_in(tmp_path), timeout=30, what="the API's children to exit")
