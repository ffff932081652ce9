"""The web page (/ui) in a real browser: the system's headless Chromium, driven by selenium,
against real servers on 127.0.0.1. Each test leaves a screenshot in test-output/screenshots/.
(The page's files without a browser: api/test_web_ui_files.py.)"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..support import REPO
from ..support.processes import launched, two_ranks_config
from ..support.server import RunningServer, running_server, write_config
from ..support.web_ui import BROWSER_ACCEPT, two_models

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # reported by the browser fixture
    webdriver = None

SCREENSHOTS = REPO / "test-output" / "screenshots"
# Without the background-networking flags Chromium keeps trying to reach Google's servers.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,900",
)
WAIT_S = 20
# Greedy on the tiny qwen, this prompt runs to max_tokens: long enough to watch it stream.
PROMPT = "Tell me a <b>story</b> about a cat."


# ---- the browser -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver from the system; missing, the tests skip (fail under CI)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    missing = [
        what
        for what, found in (
            ("selenium", webdriver),
            ("chromium", chromium),
            ("chromedriver", chromedriver),
        )
        if found is None
    ]
    if missing:
        reason = (
            f"{', '.join(missing)} not found: apt-get install chromium chromium-driver "
            '(and pip install ".[test]") to run the browser tests'
        )
        if "CI" in os.environ:
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium, chromedriver


@pytest.fixture
def browser(
    browser_paths: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[WebDriver]:
    chromium, chromedriver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with the driver's path given, selenium-manager never runs
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        screenshot(driver, request.node.name)
        driver.quit()


def screenshot(driver: WebDriver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / (re.sub(r"[^\w.-]+", "_", name) + ".png")))


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    try:
        return WebDriverWait(
            driver, WAIT_S, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
        ).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page did not show {what} within {WAIT_S} s") from None


def text_of(driver: WebDriver, selector: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url + "/")  # a browser asking for / is sent to the page
    assert driver.current_url == url + "/ui"
    wait_for(driver, lambda d: text_of(d, "#status-text").startswith("serving"), "serving")


def assert_no_script_errors(driver: WebDriver) -> None:
    errors = [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]
    assert not errors, errors


def assert_only_this_server(driver: WebDriver, url: str) -> None:
    fetched = driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    assert fetched and all(name.startswith(url + "/") for name in fetched), fetched


# ---- servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path]
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("web")
    speculating = '[models.qwen.speculative]\nmethod = "ngram"\n'
    with running_server(
        write_config(tmp, two_models(tmp, tiny_checkpoints, speculating))
    ) as running:
        yield running


# ---- in the browser --------------------------------------------------------------------


def bubble_state(driver: WebDriver) -> tuple[int, str]:
    return tuple(
        driver.execute_script(
            "const m = [...document.querySelectorAll('.msg.assistant')].pop();"
            "return m ? [m.querySelector('.bubble').textContent.length, m.dataset.state]"
            " : [0, 'none'];"
        )
    )


def test_chat_streams_into_the_assistant_bubble(server: RunningServer, browser: WebDriver) -> None:
    open_page(browser, server.url)
    wait_for(browser, lambda d: "qwen" in text_of(d, "#model"), "the registry's models")
    picker = Select(browser.find_element(By.ID, "model"))
    assert picker.first_selected_option.get_attribute("value") == "llama"  # the default
    picker.select_by_value("qwen")
    browser.find_element(By.ID, "system-prompt").send_keys("You tell short stories.")
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max-tokens").send_keys("300")
    browser.find_element(By.ID, "prompt").send_keys(PROMPT, Keys.ENTER)

    seen, deadline = [], time.monotonic() + WAIT_S
    while (current := bubble_state(browser))[1] in ("none", "streaming"):
        assert time.monotonic() < deadline, f"the reply did not end within {WAIT_S} s"
        if current[0] and (not seen or current[0] > seen[-1]):
            seen.append(current[0])
    length, state = current
    assert state == "done", text_of(browser, ".msg.assistant .meta")
    assert len(seen) >= 2, f"the text did not arrive in pieces: lengths seen {seen}"
    assert seen[-1] <= length

    user = browser.find_element(By.CSS_SELECTOR, ".msg.user .bubble")
    assert user.text == PROMPT and not user.find_elements(By.TAG_NAME, "b")  # shown as text
    meta = text_of(browser, ".msg.assistant .meta")
    found = re.search(r"(\d+) tokens .* finish: (\w+)", meta)
    assert found, meta
    tokens, finish = int(found[1]), found[2]
    assert tokens == 300 if finish == "length" else 0 < tokens < 300, meta  # max_tokens was sent
    speculator = server.engine.workers["qwen"].speculator  # qwen drafts by prompt lookup
    accepted = f"({speculator.accepted_tokens}/{speculator.drafted_tokens})"
    assert speculator.accepted_tokens and "drafts accepted" in meta and accepted in meta, meta
    assert not browser.find_element(By.ID, "send").get_attribute("disabled")
    assert text_of(browser, ".msg.assistant .role") == "qwen"
    assert "qwen" in server.engine.loaded_models()
    assert_no_script_errors(browser)


THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A tiny Qwen whose template opens <think> in the prompt, as Qwen3's does."""
    from mlxserve.plugins.families.qwen import Qwen
    from mlxserve.plugins.tiny import write_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("thinker")
    checkpoint = write_tiny_checkpoint(
        Qwen(),
        tmp / "q",
        seed=3,
        chat_template=THINKING_TEMPLATE,
        extra_tokens=("<think>", "</think>"),
    )
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "thinker"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.thinker]\nsource = "{checkpoint}"\n',
    )
    with running_server(config) as running:
        yield running


def test_a_thinking_models_reasoning_folds_above_its_answer(
    thinker: RunningServer, browser: WebDriver
) -> None:
    """The page shows delta.reasoning_content in a "Thinking" fold above the answer, as the API
    gives them for the same greedy request."""
    ask = "What is the capital of France?"
    body = {
        "model": "thinker",
        "messages": [{"role": "user", "content": ask}],
        "temperature": 0,
        "max_tokens": 24,
    }
    reply = httpx.post(thinker.url + "/v1/chat/completions", json=body, timeout=60).json()
    message = reply["choices"][0]["message"]
    assert message.get("reasoning_content")

    open_page(browser, thinker.url)
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max-tokens").send_keys("24")
    browser.find_element(By.ID, "prompt").send_keys(ask, Keys.ENTER)
    wait_for(browser, lambda d: bubble_state(d)[1] == "done", "the reply's end")
    fold = browser.find_element(By.CSS_SELECTOR, ".msg.assistant details.thinking")
    shown = browser.execute_script(
        "const b = document.querySelector('.msg.assistant .bubble');"
        "return [b.querySelector('.thought').textContent,"
        " [...b.childNodes].filter(n => n.nodeType === 3).map(n => n.data).join('')];"
    )
    assert shown == [message["reasoning_content"], message["content"] or ""]
    assert not message["content"]  # the tiny model never ends its thinking: the fold stays open
    assert fold.get_attribute("open") is not None
    assert_no_script_errors(browser)


def test_cluster_view_on_one_rank(server: RunningServer, browser: WebDriver) -> None:
    open_page(browser, server.url)
    assert text_of(browser, "#status-text") == "serving · one machine"
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".rank .share"), "a rank")
    ranks = browser.find_elements(By.CSS_SELECTOR, ".rank")
    assert [r.get_attribute("data-rank") for r in ranks] == ["0"]
    assert "rank 0" in ranks[0].text and "single machine" in ranks[0].text
    share = browser.find_element(By.CSS_SELECTOR, '.share[data-model="llama"]')
    placement = httpx.get(server.url + "/health").json().get("placement", {}).get("llama")
    if placement:
        first, last = placement["stages"][0]["layers"]
        assert f"layers {first}–{last}" in share.text and "MiB" in share.text
    else:
        assert "whole model" in share.text
    load = browser.find_element(By.CSS_SELECTOR, '.load[data-model="llama"]')
    assert re.search(r"KV \d+%", load.text), load.text
    for stat, value in (("running", "0"), ("waiting", "0"), ("micro-batches", "1")):
        assert load.find_element(By.CSS_SELECTOR, f'[data-stat="{stat}"]').text == value
    assert_only_this_server(browser, server.url)
    assert_no_script_errors(browser)


def chart_pixels(driver: WebDriver) -> int:
    """How many pixels of the chart have the accent colour of its line."""
    return driver.execute_script(
        "const c = document.getElementById('tps-chart');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4)"
        "  if (d[i + 2] > 180 && d[i] < 120 && d[i + 3] > 200) n++;"
        "return n;"
    )


def test_tokens_per_second_chart_gets_data_after_a_generation(
    server: RunningServer, browser: WebDriver
) -> None:
    open_page(browser, server.url)
    assert text_of(browser, "#tps-peak") == "0.0"
    assert chart_pixels(browser) == 0
    body = {"model": "llama", "prompt": "Once upon", "max_tokens": 200, "ignore_eos": True}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    wait_for(browser, lambda d: float(text_of(d, "#tps-peak")) > 0, "tokens/s above 0")
    wait_for(browser, lambda d: float(text_of(d, "#tps-now")) == 0, "tokens/s back to 0")
    assert chart_pixels(browser) > 20
    assert_no_script_errors(browser)


def model_row(driver: WebDriver, name: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'.model-row[data-model="{name}"]')


def click_model_button(driver: WebDriver, name: str, loaded_after: bool | None = None) -> None:
    model_row(driver, name).find_element(By.TAG_NAME, "button").click()
    if loaded_after is not None:
        wanted = str(loaded_after).lower()
        wait_for(
            driver,
            lambda d: model_row(d, name).get_attribute("data-loaded") == wanted,
            f"{name} {'loaded' if loaded_after else 'unloaded'}",
        )


def send_and_wait(driver: WebDriver, text: str) -> tuple[str, str]:
    """Send a chat message; the reply's state (done, error) and its meta line, once ended."""
    count = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(text, Keys.ENTER)

    def ended(d: WebDriver) -> tuple[str, str] | None:
        replies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if len(replies) <= count or replies[-1].get_attribute("data-state") == "streaming":
            return None
        meta = replies[-1].find_element(By.CLASS_NAME, "meta").text
        return replies[-1].get_attribute("data-state"), meta

    return wait_for(driver, ended, "the reply's end")


def banner_shown(driver: WebDriver) -> bool:
    return driver.find_element(By.ID, "auth-banner").is_displayed()


def test_api_key_then_load_and_unload(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], browser: WebDriver
) -> None:
    text = two_models(tmp_path, tiny_checkpoints, '[server]\napi_keys = ["sk-web"]\n')
    with running_server(write_config(tmp_path, text)) as srv:
        assert httpx.get(srv.url + "/").status_code == 401
        redirect = httpx.get(srv.url + "/", headers={"Accept": BROWSER_ACCEPT})
        assert redirect.status_code == 307 and redirect.headers["location"] == "/ui"
        open_page(browser, srv.url)
        wait_for(browser, banner_shown, "the API key banner")
        banner = browser.find_element(By.ID, "auth-banner").text
        assert "401" in banner and "API key" in banner
        rows = browser.find_elements(By.CSS_SELECTOR, ".model-row")
        assert [r.get_attribute("data-model") for r in rows] == ["llama"]  # from /health
        browser.find_element(By.ID, "max-tokens").send_keys("16")
        state, meta = send_and_wait(browser, "Hello")
        assert state == "error" and "401" in meta, meta
        click_model_button(browser, "llama")
        wait_for(browser, lambda d: "401" in model_row(d, "llama").text, "the refused unload")
        screenshot(browser, "test_api_key_then_load_and_unload-401")

        browser.find_element(By.ID, "api-key").send_keys("sk-web", Keys.ENTER)
        wait_for(browser, lambda d: not banner_shown(d), "the banner gone")
        assert browser.execute_script("return localStorage.getItem('mlxserve.apiKey')") == "sk-web"
        wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-model="qwen"]'), "qwen")
        assert "401" not in model_row(browser, "llama").text
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Hello"
        state, meta = send_and_wait(browser, "")  # the refused question, sent again
        assert state == "done" and "tokens" in meta, meta

        click_model_button(browser, "qwen", loaded_after=True)
        assert httpx.get(srv.url + "/health").json()["loaded_models"] == ["llama", "qwen"]
        click_model_button(browser, "llama", loaded_after=False)
        assert httpx.get(srv.url + "/health").json()["loaded_models"] == ["qwen"]
        assert "not loaded" in model_row(browser, "llama").text
        assert "(loaded)" in text_of(browser, '#model option[value="qwen"]')
        assert_no_script_errors(browser)


@pytest.mark.process  # also starts `mlxserve launch`: a process test as well
def test_cluster_view_on_two_pipeline_ranks(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], browser: WebDriver
) -> None:
    text = two_ranks_config(tmp_path, tiny_checkpoints["llama"], 'strategy = "pipeline"\n')
    with launched(tmp_path, text) as (url, _):
        stages = httpx.get(url + "/health").json()["placement"]["m"]["stages"]
        open_page(browser, url)
        assert text_of(browser, "#status-text") == "serving · pipeline · 2 ranks"
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".share")) == 2, "ranks")
        for stage in stages:
            card = browser.find_element(By.CSS_SELECTOR, f'.rank[data-rank="{stage["rank"]}"]')
            first, last = stage["layers"]
            assert f"rank {stage['rank']}" in card.text and stage["host"] in card.text
            assert f"layers {first}–{last}" in card.text, card.text
        assert [s["layers"] for s in stages] == [[2, 3], [0, 1]]
        load = browser.find_element(By.CSS_SELECTOR, '.load[data-model="m"]')
        assert load.find_element(By.CSS_SELECTOR, '[data-stat="micro-batches"]').text == "2"
        assert_only_this_server(browser, url)
        assert_no_script_errors(browser)
