"""The web dashboard over real HTTP, and once in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Worker, make_key, tiny_job

pytestmark = pytest.mark.timeout(300)
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@contextmanager
def _signed_in(api_url: str, key: str) -> Iterator[httpx.Client]:
    """A cookie-keeping client signed in through the form, as a browser would be."""
    with httpx.Client(base_url=api_url, timeout=30) as browser:
        answer = browser.post("/ui/login", data={"api_key": key})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs"
        yield browser


def test_sign_in_keeps_the_key_in_an_httponly_strict_cookie(api_url: str, api_key: str) -> None:
    with httpx.Client(base_url=api_url, timeout=30) as anonymous:
        for method, path in [
            ("GET", "/ui/jobs"),
            ("GET", "/ui/jobs.json"),
            ("GET", "/ui/jobs/job-x"),
            ("GET", "/ui/jobs/job-x/events/stream"),
            ("GET", "/ui/jobs/job-x/artifacts/file-x"),
            ("POST", "/ui/jobs/job-x/cancel"),
            ("GET", "/ui/datasets"),
            ("POST", "/ui/datasets"),
        ]:
            away = anonymous.request(method, path, cookies={"grait_key": "gk-forged"})
            assert away.status_code == 303, (method, path)
            assert away.headers["location"] == "/ui/login"
        wrong = anonymous.post("/ui/login", data={"api_key": "gk-not-a-key"})
        assert wrong.status_code == 401 and "unknown or revoked" in wrong.text
        right = anonymous.post("/ui/login", data={"api_key": api_key})
    cookie = right.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    assert api_key not in right.headers["location"]
    with _signed_in(api_url, api_key) as browser:
        assert browser.get("/ui/jobs").status_code == 200
        assert browser.post("/ui/logout").headers["location"] == "/ui/login"
        assert browser.get("/ui/jobs").status_code == 303  # the cookie is gone


def test_pages_show_the_tenants_jobs_and_another_tenants_job_is_a_404_page(
    api_url: str,
    api_key: str,
    client: httpx.Client,
    datasets: dict[str, str],
    tiny_model: Path,
    service_env: dict[str, str],
    no_worker: Worker,
) -> None:
    job = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets)).json()
    with _signed_in(api_url, api_key) as browser:
        listing = browser.get("/ui/jobs")
        assert f'href="/ui/jobs/{job["id"]}"' in listing.text
        feed = browser.get("/ui/jobs.json").json()["data"]
        assert {"id": job["id"], "status": "queued"}.items() <= feed[0].items()
        page = browser.get(f"/ui/jobs/{job['id']}")
        assert page.status_code == 200
        for stage in ("knowledge_query", "gradient_features", "training", "evaluation"):
            assert f'data-stage="{stage}"' in page.text
        assert 'id="cancel"' in page.text
        cancelled = browser.post(f"/ui/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 303
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        cancelled_page = browser.get(f"/ui/jobs/{job['id']}").text
        assert 'id="cancel"' not in cancelled_page and 'id="try-it"' not in cancelled_page
        asked = browser.post(f"/ui/jobs/{job['id']}/chat", json={"question": "Who?"})
        assert asked.status_code == 409 and "has no tuned model" in asked.text
    with _signed_in(api_url, make_key(service_env, "beta")) as other:
        foreign = other.get(f"/ui/jobs/{job['id']}")
        unknown = other.get("/ui/jobs/job-000000000000deadbeef")
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.text.replace(job["id"], "") == unknown.text.replace(
            "job-000000000000deadbeef", ""
        )
        assert job["id"] not in other.get("/ui/jobs").text
        assert other.post(f"/ui/jobs/{job['id']}/cancel").status_code == 404
        asked = other.post(f"/ui/jobs/{job['id']}/chat", json={"question": "Who?"})
        assert asked.status_code == 404


def test_the_submit_form_names_what_is_wrong_and_never_uses_another_tenants_data(
    api_url: str,
    api_key: str,
    datasets: dict[str, str],
    service_env: dict[str, str],
    no_worker: Worker,
) -> None:
    train = datasets["mmlu"]
    with _signed_in(api_url, api_key) as browser:
        form = browser.get("/ui/jobs").text
        assert 'id="submit-job"' in form and f'value="{train}"' in form
        broken = browser.post("/ui/jobs", data={"train_dataset": train, "spec": '{"seed": '})
        assert broken.status_code == 422 and "more settings: Expecting value" in broken.text
        typed = browser.post("/ui/jobs", data={"train_dataset": train, "spec": '{"seed": "x"}'})
        assert typed.status_code == 422 and "seed:" in typed.text
        method = browser.post("/ui/jobs", data={"train_dataset": train, "method": "magic"})
        assert method.status_code == 422 and "method:" in method.text
    with _signed_in(api_url, make_key(service_env, "gamma")) as other:
        foreign = other.post("/ui/jobs", data={"train_dataset": train})
        # As the API answers it: a dataset the tenant cannot see is one that does not exist.
        assert (
            foreign.status_code == 422 and f"No dataset with id &#39;{train}&#39;" in foreign.text
        )
        assert train not in other.get("/ui/jobs").text  # not offered in the form either


def test_an_upload_that_does_not_read_shows_its_line(api_url: str, api_key: str) -> None:
    bad = b'{"id": "q1", "question": "Q?", "answer": "A"}\n{"id": "q2", "question": \n'
    with _signed_in(api_url, api_key) as browser:
        answer = browser.post("/ui/datasets", files={"file": ("bad.jsonl", bad)})
        assert answer.status_code == 422, answer.text
        assert 'id="upload-error"' in answer.text and "line 2" in answer.text
        good = b'{"id": "q1", "question": "Capital of France?", "answer": "Paris"}\n'
        stored = browser.post("/ui/datasets", files={"file": ("good.jsonl", good)})
        assert stored.status_code == 201 and 'id="upload-ok"' in stored.text


def _chrome() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (setup.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_a_job_followed_live_in_a_real_browser(
    api_url: str,
    api_key: str,
    client: httpx.Client,
    datasets: dict[str, str],
    tiny_model: Path,
    worker: Worker,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _chrome()
    try:
        browser.get(f"{api_url}/ui/jobs")
        browser.find_element(By.ID, "api_key").send_keys(api_key)
        browser.find_element(By.ID, "sign-in").click()
        WebDriverWait(browser, 20).until(ec.url_contains("/ui/jobs"))
        assert api_key not in browser.current_url
        cookie = browser.get_cookie("grait_key")
        assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert browser.execute_script("return document.cookie") == ""  # unreadable to scripts

        # Upload through the page: a file that does not parse names its line, a good one lands.
        (tmp_path / "bad.jsonl").write_text(
            '{"id": "q1", "question": "Q?", "answer": "A"}\n{"id":\n'
        )
        (tmp_path / "good.jsonl").write_text('{"id": "q1", "question": "Q?", "answer": "A"}\n')
        for name, shown in (("bad.jsonl", "upload-error"), ("good.jsonl", "upload-ok")):
            browser.get(f"{api_url}/ui/datasets")
            browser.find_element(By.ID, "file").send_keys(str(tmp_path / name))
            browser.find_element(By.ID, "upload-button").click()
            message = WebDriverWait(browser, 20).until(
                ec.presence_of_element_located((By.ID, shown))
            )
            assert (
                ("line 2" in message.text) if name == "bad.jsonl" else "Stored as" in message.text
            )
        # The submit form: a spec that does not validate comes back with the field it names.
        browser.get(f"{api_url}/ui/jobs")
        browser.execute_script("document.getElementById('new-job').open = true")
        browser.find_element(By.ID, "spec").send_keys('{"seed": "first"}')
        browser.find_element(By.ID, "submit-button").click()
        error = WebDriverWait(browser, 20).until(
            ec.presence_of_element_located((By.ID, "submit-error"))
        )
        assert "seed" in error.text, error.text

        job = client.post("/v1/jobs", json=tiny_job(tiny_model, datasets)).json()
        # The list picks the new job up by itself (it polls), then the job page follows it.
        WebDriverWait(browser, 30).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-job="{job["id"]}"]'))
        )
        SCREENSHOTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOTS / "dashboard-jobs.png"))
        # A second job through the form, queued behind the first and long enough (100 epochs)
        # to be still queued or running when it is cancelled further down.
        spec = tiny_job(tiny_model, datasets, seed=1)
        spec["hyperparameters"]["training"]["epochs"] = 100
        browser.execute_script("document.getElementById('new-job').open = true")
        Select(browser.find_element(By.ID, "train_dataset")).select_by_value(spec["train_dataset"])
        Select(browser.find_element(By.ID, "method")).select_by_value("grait")
        model_field = browser.find_element(By.ID, "base_model")
        model_field.clear()
        model_field.send_keys(spec["base_model"])
        extra = {k: spec[k] for k in ("eval_datasets", "hyperparameters", "seed")}
        spec_field = browser.find_element(By.ID, "spec")
        spec_field.clear()
        browser.execute_script("arguments[0].value = arguments[1]", spec_field, json.dumps(extra))
        browser.find_element(By.ID, "submit-button").click()
        WebDriverWait(browser, 20).until(ec.url_matches(r"/ui/jobs/job-[0-9a-f]+$"))
        other = client.get(f"/v1/jobs/{browser.current_url.rsplit('/', 1)[-1]}").json()
        assert other["method"] == "grait" and other["seed"] == 1
        assert other["hyperparameters"]["lora"]["r"] == 4  # from the JSON settings
        browser.get(f"{api_url}/ui/jobs/{job['id']}")
        started = time.monotonic()
        # The percent moves while the page stays loaded (a marker set now would not survive
        # a reload), until the stream reports the end.
        browser.execute_script("window.stillLoaded = true")
        seen: list[str] = []
        while time.monotonic() - started < 240:
            status = browser.find_element(By.ID, "job-status").text
            if status.startswith("succeeded"):
                break
            if browser.execute_script("return window.stillLoaded === true"):
                seen.append(browser.find_element(By.ID, "job-percent").text)
            time.sleep(0.2)
        assert len(set(seen)) >= 2, seen
        WebDriverWait(browser, 240).until(
            ec.text_to_be_present_in_element((By.ID, "job-status"), "succeeded")
        )
        # The finished page (reloaded when the stream closed) has the report and artifacts.
        WebDriverWait(browser, 30).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "table.report"))
        )
        # The report splits refusals by what the base model got right (the base row has none).
        table = browser.find_element(By.CSS_SELECTOR, "table.report")
        assert "Over-refusal" in table.find_element(By.TAG_NAME, "thead").text
        base_row, tuned_row = table.find_elements(By.CSS_SELECTOR, "tbody tr")[:2]
        assert [c.text for c in base_row.find_elements(By.TAG_NAME, "td")][-2:] == ["–", "–"]
        over, unknown = (c.text for c in tuned_row.find_elements(By.TAG_NAME, "td")[-2:])
        # A tiny random model gets most questions wrong, so the "base wrong" side has some;
        # the "base right" side may be empty (then it is a dash, not 0%).
        assert unknown.endswith("%") and (over.endswith("%") or over == "–")
        rows = browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")
        assert any("Job succeeded" in r.get_attribute("textContent") for r in rows)
        done = browser.find_elements(By.CSS_SELECTOR, "#timeline li.stage-done")
        assert {li.get_attribute("data-stage") for li in done} >= {"training", "evaluation"}
        links = browser.find_elements(By.CSS_SELECTOR, "#artifacts a")
        (adapter,) = [a.get_attribute("href") for a in links if a.text.endswith(".tar.gz")]
        # The download, as the browser fetches it with its cookie: a gzip archive.
        head = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0]).then(r => r.arrayBuffer())"
            ".then(b => done(Array.from(new Uint8Array(b.slice(0, 2)))))",
            adapter,
        )
        assert head == [0x1F, 0x8B]
        assert time.monotonic() - started < 240
        browser.set_window_size(1280, 1600)
        assert browser.save_screenshot(str(SCREENSHOTS / "dashboard-job-report.png"))
        # Per-question answers, filtered by the tuned model's outcome and the base's knowledge.
        rows = browser.find_elements(By.CSS_SELECTOR, "#answers tbody tr")
        assert len(rows) == 12  # two 6-question eval sets
        wrong = sum(r.get_attribute("data-outcome") == "wrong" for r in rows)
        Select(browser.find_element(By.ID, "outcome")).select_by_value("wrong")
        browser.find_element(By.ID, "filter").click()
        WebDriverWait(browser, 20).until(ec.url_contains("outcome=wrong"))
        shown = browser.find_elements(By.CSS_SELECTOR, "#answers tbody tr")
        assert len(shown) == wrong
        assert all(r.get_attribute("data-outcome") == "wrong" for r in shown)
        assert browser.find_element(By.ID, "answers-count").text.startswith(f"{wrong} of 12")
        browser.execute_script("document.getElementById('answers').scrollIntoView()")
        assert browser.save_screenshot(str(SCREENSHOTS / "dashboard-answers-wrong.png"))
        # The try-it box: a question to the tuned model, answered on the page.
        browser.find_element(By.ID, "try-question").send_keys("What do bees make?")
        browser.find_element(By.ID, "try-ask").click()
        answer = browser.find_element(By.ID, "try-answer")
        WebDriverWait(browser, 60).until(lambda _: answer.get_attribute("data-state") == "done")
        assert "error" not in (answer.get_attribute("class") or ""), answer.text
        assert browser.find_element(By.ID, "try-meta").text.startswith("Answered in")
        browser.set_window_size(1280, 900)
        browser.execute_script(  # the box with its heading, the answer and the report below
            "window.scrollTo(0, arguments[0].getBoundingClientRect().top + window.scrollY - 120)",
            browser.find_element(By.ID, "try-it"),
        )
        assert browser.save_screenshot(str(SCREENSHOTS / "dashboard-try-it.png"))

        # The other job, queued behind the first or running by now, cancelled from its page.
        browser.get(f"{api_url}/ui/jobs/{other['id']}")
        browser.find_element(By.ID, "cancel").click()
        WebDriverWait(browser, 120).until(
            lambda _: client.get(f"/v1/jobs/{other['id']}").json()["status"] == "cancelled"
        )
        browser.get(f"{api_url}/ui/jobs/{other['id']}")
        assert browser.find_element(By.ID, "job-status").text.startswith("cancelled")
    finally:
        browser.quit()
