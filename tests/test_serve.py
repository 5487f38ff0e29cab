"""`python -m cm3jax.serve`: the request batcher, the HTTP API over the sample world, and its page.

The batcher is tested alone with fake work functions (no JAX, no HTTP). The API tests run a
real server on 127.0.0.1 (a free port) in a thread, over the `sample_world` LM of conftest,
with small limits and a long batching window so concurrent requests reliably share a call.
The page is driven by headless Chromium through Selenium when both are installed
(`apt-get install chromium chromium-driver`, `pip install selenium`); otherwise that test
is skipped with the reason.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from cm3jax.data.records import ArrayRecordDocuments, split_paths
from cm3jax.errors import UserError
from cm3jax.sampling.batcher import Batcher, BatcherClosed
from cm3jax.sampling.generate import Generator
from cm3jax.serve import Limits, make_server
from cm3jax.tokenizers.image import load_image_tokenizer

RESOLUTION = 32
# max_batch 4: text2image with up to 4 samples keeps the decoder's (8-device padded) shapes of the
# warm-up, so the tests compile once. The long window makes concurrent requests share a call.
LIMITS = Limits(max_prompt_chars=100, max_image_bytes=60_000, max_num_samples=4, max_retrieve=2, max_batch=4,
                batch_window_ms=400, max_queue=16, max_caption_tokens=8)
USER_ERROR_PROMPT = "please refuse me"  # the wrapped generator raises UserError for it
CRASH_PROMPT = "please crash"  # ... and RuntimeError for this one
WAIT_S = 120  # the CPU is slow and shared


# --- the batcher alone ----------------------------------------------------------------------------


class RecordingWork:
    """A fake work function: records each call's (key, items), returns item * 10 (or raises)."""

    def __init__(self, fail_keys=(), delay_s: float = 0.0):
        self.calls: list[tuple[str, list]] = []
        self.fail_keys = set(fail_keys)
        self.delay_s = delay_s

    def __call__(self, key, items):
        self.calls.append((key, list(items)))
        time.sleep(self.delay_s)
        if key in self.fail_keys:
            raise RuntimeError(f"work failed for {key}")
        return [ValueError(f"bad item {i}") if i < 0 else i * 10 for i in items]


@pytest.fixture
def make_batcher():
    made = []

    def make(work, max_batch=8, window_s=0.3, **kwargs):
        batcher = Batcher(work, max_batch, window_s, **kwargs)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close(timeout=5)


def test_batcher_compatible_requests_within_the_window_are_one_call(make_batcher):
    work = RecordingWork()
    batcher = make_batcher(work)
    futures = [batcher.submit("a", i) for i in range(3)]
    assert [f.result(timeout=10) for f in futures] == [0, 10, 20]
    assert work.calls == [("a", [0, 1, 2])] and batcher.calls == 1


def test_batcher_splits_incompatible_requests_oldest_first(make_batcher):
    work = RecordingWork()
    batcher = make_batcher(work)
    futures = [batcher.submit(key, i) for key, i in [("a", 1), ("b", 2), ("a", 3), ("b", 4)]]
    assert [f.result(timeout=10) for f in futures] == [10, 20, 30, 40]
    assert work.calls == [("a", [1, 3]), ("b", [2, 4])]


def test_batcher_respects_max_batch(make_batcher):
    work = RecordingWork()
    batcher = make_batcher(work, max_batch=2)
    futures = [batcher.submit("a", i) for i in range(5)]
    assert [f.result(timeout=10) for f in futures] == [0, 10, 20, 30, 40]
    assert [items for _, items in work.calls] == [[0, 1], [2, 3], [4]]


def test_batcher_does_not_wait_for_the_window_once_a_batch_is_full(make_batcher):
    batcher = make_batcher(RecordingWork(), max_batch=2, window_s=30)
    start = time.monotonic()
    futures = [batcher.submit("a", i) for i in range(2)]
    assert [f.result(timeout=10) for f in futures] == [0, 10]
    assert time.monotonic() - start < 10


def test_batcher_work_errors_reach_every_request_and_it_keeps_serving(make_batcher):
    work = RecordingWork(fail_keys={"bad"})
    batcher = make_batcher(work)
    failing = [batcher.submit("bad", i) for i in range(3)]
    for future in failing:
        with pytest.raises(RuntimeError, match="work failed for bad"):
            future.result(timeout=10)
    # One item's own error (an exception returned in its place) fails that request only.
    mixed = [batcher.submit("a", i) for i in (1, -1, 2)]
    assert mixed[0].result(timeout=10) == 10 and mixed[2].result(timeout=10) == 20
    with pytest.raises(ValueError, match="bad item -1"):
        mixed[1].result(timeout=10)
    assert batcher.submit("a", 5).result(timeout=10) == 50


def test_batcher_close_fails_waiting_requests(make_batcher):
    started, release = threading.Event(), threading.Event()

    def work(key, items):
        started.set()
        release.wait(10)
        return [i * 10 for i in items]

    batcher = make_batcher(work, max_batch=1, window_s=0)
    first = batcher.submit("a", 1)
    assert started.wait(10)  # the worker is busy with `first`
    queued = batcher.submit("a", 2)
    closer = threading.Thread(target=batcher.close, kwargs={"timeout": 10})
    closer.start()
    assert isinstance(queued.exception(timeout=10), BatcherClosed)
    with pytest.raises(BatcherClosed):
        batcher.submit("a", 3)
    release.set()
    closer.join(10)
    assert first.result(timeout=10) == 10


# --- the HTTP API -------------------------------------------------------------------------------


def _counting(generator: Generator, name: str, calls: dict) -> None:
    """Counts the generator's `name` calls; the test prompts make text2image fail on purpose."""
    method = getattr(generator, name)

    def wrapped(batch, *args, **kwargs):
        calls[name] += 1
        if name == "text2image" and CRASH_PROMPT in batch:
            raise RuntimeError("the test's crash")
        if name == "text2image" and USER_ERROR_PROMPT in batch:
            raise UserError("prompt: refused by the test generator")
        return method(batch, *args, **kwargs)

    setattr(generator, name, wrapped)


@pytest.fixture(scope="module")
def served(sample_world):
    generator = Generator.load(sample_world["lm"])
    calls = {"text2image": 0, "image2text": 0}
    for name in calls:
        _counting(generator, name, calls)
    start = time.time()
    server, batcher = make_server(generator, "127.0.0.1", 0, LIMITS)
    warmup_s = time.time() - start
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield types.SimpleNamespace(port=server.server_address[1], url=server.url, calls=calls, generator=generator,
                                batcher=batcher, warmup_s=warmup_s)
    server.shutdown()
    server.server_close()
    batcher.close(timeout=30)
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def validation_png(sample_world) -> bytes:
    records = ArrayRecordDocuments(split_paths(sample_world["data"], "validation"))
    pixels = load_image_tokenizer(sample_world["data"]).decode(np.stack([records[0]["image"]]))[0]
    return _png(pixels)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _request(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, dict | str, dict]:
    """(status, parsed JSON or text, headers) of one request."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        content_type = response.getheader("Content-Type", "")
        payload = json.loads(data) if content_type.startswith("application/json") else data.decode()
        return response.status, payload, dict(response.getheaders())
    finally:
        connection.close()


def _raw_request(port: int, lines: list[str]) -> tuple[int, dict]:
    """Sends a request head exactly as given (no body); the status and JSON reply."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        connection.putrequest("POST", "/text2image", skip_accept_encoding=True)
        for line in lines:
            name, value = line.split(": ", 1)
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_health(served, sample_world):
    status, reply, _ = _request(served.port, "GET", "/health")
    assert status == 200
    assert reply["status"] == "ok" and reply["workdir"] == sample_world["lm"]
    assert reply["step"] == served.generator.model.step and reply["retrieval"] is True
    assert reply["limits"]["max_batch"] == LIMITS.max_batch


def test_warm_up_compiled_both_tasks_before_listening(served):
    # make_server ran one padded call of each task before it returned (i.e. before listening).
    assert served.calls["text2image"] >= 1 and served.calls["image2text"] >= 1
    print(f"warm-up took {served.warmup_s:.1f}s")


def test_text2image_returns_pngs_best_first(served):
    body = {"prompt": "a large red circle in the centre", "num_samples": 3, "seed": 1}
    status, reply, headers = _request(served.port, "POST", "/text2image", body)
    assert status == 200, reply
    assert headers["Content-Type"] == "application/json"
    assert reply["prompt"] == body["prompt"] and reply["retrieved"] == []
    candidates = reply["candidates"]
    assert len(candidates) == 3
    assert sorted(c["method"] for c in candidates) == ["cd_k", "top_p", "top_p"]
    scores = [c["score"] for c in candidates]
    assert all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)
    for candidate in candidates:
        pixels = _decode_png(candidate["png_base64"])
        assert pixels.shape == (RESOLUTION, RESOLUTION, 3) and pixels.dtype == np.uint8


def test_text2image_with_retrieval(served):
    status, reply, _ = _request(served.port, "POST", "/text2image",
                                {"prompt": "a small blue square", "num_samples": 1, "retrieve": 1})
    assert status == 200, reply
    assert len(reply["retrieved"]) == 1 and isinstance(reply["retrieved"][0], str)
    assert len(reply["candidates"]) == 1


def test_image2text_captions_a_png(served, validation_png):
    body = {"image_base64": base64.b64encode(validation_png).decode()}
    status, reply, _ = _request(served.port, "POST", "/image2text", body)
    assert status == 200, reply
    assert set(reply) == {"caption"} and isinstance(reply["caption"], str)
    # A data: URL (what a browser's FileReader gives) is accepted too.
    body = {"image_base64": "data:image/png;base64," + body["image_base64"]}
    status, again, _ = _request(served.port, "POST", "/image2text", body)
    assert status == 200 and again == reply


def test_concurrent_requests_share_generator_calls(served):
    prompts = [f"a {colour} circle" for colour in ("red", "green", "blue", "yellow")]
    before = served.calls["text2image"]

    def ask(prompt):
        return _request(served.port, "POST", "/text2image", {"prompt": prompt, "num_samples": 2})

    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(ask, prompts))
    calls = served.calls["text2image"] - before
    for prompt, (status, reply, _) in zip(prompts, replies):
        assert status == 200, reply
        assert reply["prompt"] == prompt and len(reply["candidates"]) == 2
        for candidate in reply["candidates"]:
            assert _decode_png(candidate["png_base64"]).shape == (RESOLUTION, RESOLUTION, 3)
    assert 1 <= calls < len(prompts), f"{len(prompts)} requests took {calls} generator calls"


def test_get_page(served):
    status, page, headers = _request(served.port, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for element in ('id="prompt"', 'id="num_samples"', 'id="generate"', 'id="results"', 'id="image_file"',
                    'id="caption"', 'id="error"'):
        assert element in page
    assert "http://" not in page and "https://" not in page  # no external resources


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bomb_png() -> bytes:
    """A tiny file announcing 5000 x 5000 pixels."""
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    # name: (method, path, body, status, text the error must contain)
    "malformed_json": ("POST", "/text2image", b'{"prompt": ', 400, "body"),
    "not_utf8": ("POST", "/text2image", b"\xff\xfe{}", 400, "body"),
    "not_an_object": ("POST", "/text2image", [1, 2], 400, "body"),
    "unknown_field": ("POST", "/text2image", {"prompt": "x", "colour": "red"}, 400, "colour"),
    "missing_prompt": ("POST", "/text2image", {}, 400, "prompt"),
    "prompt_type": ("POST", "/text2image", {"prompt": 3}, 400, "prompt"),
    "empty_prompt": ("POST", "/text2image", {"prompt": "   "}, 400, "prompt"),
    "long_prompt": ("POST", "/text2image", {"prompt": "red " * 30}, 400, "prompt"),
    "num_samples_zero": ("POST", "/text2image", {"prompt": "x", "num_samples": 0}, 400, "num_samples"),
    "num_samples_over": ("POST", "/text2image", {"prompt": "x", "num_samples": 5}, 400, "num_samples"),
    "num_samples_string": ("POST", "/text2image", {"prompt": "x", "num_samples": "2"}, 400, "num_samples"),
    "num_samples_bool": ("POST", "/text2image", {"prompt": "x", "num_samples": True}, 400, "num_samples"),
    "retrieve_negative": ("POST", "/text2image", {"prompt": "x", "retrieve": -1}, 400, "retrieve"),
    "retrieve_over": ("POST", "/text2image", {"prompt": "x", "retrieve": 3}, 400, "retrieve"),
    "guidance_type": ("POST", "/text2image", {"prompt": "x", "guidance": "high"}, 400, "guidance"),
    "guidance_range": ("POST", "/text2image", {"prompt": "x", "guidance": 1e9}, 400, "guidance"),
    "seed_negative": ("POST", "/text2image", {"prompt": "x", "seed": -1}, 400, "seed"),
    "generator_user_error": ("POST", "/text2image", {"prompt": USER_ERROR_PROMPT}, 400, "refused by the test"),
    "generator_crash": ("POST", "/text2image", {"prompt": CRASH_PROMPT}, 500, "internal error"),
    "missing_image": ("POST", "/image2text", {}, 400, "image_base64"),
    "image_type": ("POST", "/image2text", {"image_base64": 12}, 400, "image_base64"),
    "image_not_base64": ("POST", "/image2text", {"image_base64": "not base64!"}, 400, "image_base64"),
    "image_undecodable": ("POST", "/image2text", {"image_base64": _b64(b"not an image at all")}, 400,
                          "image_base64"),
    "image_too_large": ("POST", "/image2text", {"image_base64": _b64(os.urandom(60_001))}, 413, "image_base64"),
    "image_too_many_pixels": ("POST", "/image2text", {"image_base64": _b64(_bomb_png())}, 413, "image_base64"),
    "image_unknown_field": ("POST", "/image2text", {"image_base64": "", "x": 1}, 400, "x: unknown field"),
    "image_retrieve_type": ("POST", "/image2text", {"image_base64": "", "retrieve": 1.5}, 400, "retrieve"),
    "unknown_path_get": ("GET", "/nowhere", None, 404, "path"),
    "unknown_path_post": ("POST", "/nowhere", {}, 404, "path"),
    "wrong_method": ("GET", "/text2image", None, 405, "method"),
    "put": ("PUT", "/health", b"", 405, "method"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_one_clear_error_and_the_server_goes_on(case, served):
    method, path, body, expected_status, expected = BAD_REQUESTS[case]
    status, reply, headers = _request(served.port, method, path, body)
    assert status == expected_status, reply
    assert headers["Content-Type"] == "application/json" and set(reply) == {"error"}
    assert expected in reply["error"] and "\n" not in reply["error"] and "Traceback" not in reply["error"]
    assert _request(served.port, "GET", "/health")[0] == 200


def test_retrieve_without_an_index_is_refused(served, monkeypatch):
    monkeypatch.setattr(served.generator, "retriever", None)
    status, reply, _ = _request(served.port, "POST", "/text2image", {"prompt": "x", "retrieve": 1})
    assert status == 400 and reply["error"].startswith("retrieve:") and "index" in reply["error"]


def test_body_over_the_cap_is_refused_before_it_is_read(served):
    # Only the head is sent: a server that tried to read the announced gigabyte would hang.
    status, reply = _raw_request(served.port, ["Content-Type: application/json", f"Content-Length: {10**9}"])
    assert status == 413 and reply["error"].startswith("body:")
    # A client that sends the whole oversized body before it reads the reply still gets the 413.
    status, reply, _ = _request(served.port, "POST", "/image2text", b"x" * (4 * 2**20))
    assert status == 413 and reply["error"].startswith("body:")
    status, reply = _raw_request(served.port, ["Content-Type: application/json"])
    assert status == 411 and "Content-Length" in reply["error"]
    status, reply = _raw_request(served.port, ["Content-Length: lots"])
    assert status == 400 and "Content-Length" in reply["error"]


def test_one_refused_request_does_not_fail_its_batch(served):
    """A UserError for one prompt of a batch: the batch is retried per request."""
    def ask(prompt):
        return _request(served.port, "POST", "/text2image", {"prompt": prompt, "num_samples": 2})

    with ThreadPoolExecutor(2) as pool:
        good, refused = pool.map(ask, ["a green triangle", USER_ERROR_PROMPT])
    assert good[0] == 200 and len(good[1]["candidates"]) == 2
    assert refused[0] == 400 and "refused by the test" in refused[1]["error"]


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_without_workdir_is_one_error_line():
    result = subprocess.run([sys.executable, "-m", "cm3jax.serve", "--port=0"], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --workdir (an LM run directory) is required"], result.stderr[-2000:]


def test_cli_help_says_0000_exposes_the_server():
    result = subprocess.run([sys.executable, "-m", "cm3jax.serve", "--helpfull"], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "0.0.0.0" in result.stdout and "--max_batch" in result.stdout, result.stderr[-2000:]


# --- the page in a headless browser -------------------------------------------------------------


@pytest.fixture
def browser():
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -r requirements-ref.txt)")
    chromium = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                     if (path := shutil.which(name))), None)
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no Chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,1000"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as e:
        pytest.skip(f"Chromium did not start under chromedriver: {(e.msg or str(e)).splitlines()[0]}")
    yield driver
    driver.quit()


def test_page_in_a_headless_browser(browser, served, validation_png, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(served.url)
    wait.until(lambda d: "step" in d.find_element(By.ID, "health").text)

    # An empty prompt: the API's error is shown.
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text.startswith("prompt:"))

    # Text to image: the candidates appear, decoded at the tokenizer's resolution.
    browser.find_element(By.ID, "prompt").send_keys("a large red circle in the centre")
    num_samples = browser.find_element(By.ID, "num_samples")
    num_samples.clear()
    num_samples.send_keys("2")
    browser.find_element(By.ID, "generate").click()
    def loaded_image_widths(driver):
        found = driver.find_elements(By.CSS_SELECTOR, "#results img")
        widths = [driver.execute_script("return arguments[0].complete ? arguments[0].naturalWidth : 0", image)
                  for image in found]
        return widths if len(widths) == 2 and all(widths) else False

    assert wait.until(loaded_image_widths) == [RESOLUTION] * 2
    assert browser.find_element(By.ID, "error").text == ""
    assert "best" in browser.find_element(By.ID, "results").text

    # Image to text: upload a PNG, a caption appears.
    path = tmp_path / "scene.png"
    path.write_bytes(validation_png)
    browser.find_element(By.ID, "image_file").send_keys(str(path))
    browser.find_element(By.ID, "describe").click()
    wait.until(lambda d: d.find_element(By.ID, "caption").text != "")
    assert browser.find_element(By.ID, "error").text == ""
