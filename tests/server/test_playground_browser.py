"""The playground in a real browser: headless Debian chromium, driven by selenium through
chromium-driver, against `lln-serve serve` as a process on a saved tiny random model (with an
API key, typed into the page). Skipped, saying why, only where no chromium or chromedriver is
installed (`make tools` installs them as root)."""

import shutil
import time

import httpx
import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as token_models
from transformers import PreTrainedTokenizerFast

from tests.models.conftest import tiny_model
from tests.server.conftest import ServeProcess

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver binary: `make tools` installs Debian's chromium and "
    "chromium-driver (as root)",
)
KEY = "playground-key"
MODEL = "tiny"
VOCAB = 29  # the model's; the tokenizer's end-of-text token (id 29) is beyond it, so answers
# run to max_tokens (a random model would otherwise stop at random)
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


def tiny_checkpoint(path):
    vocab = {"[UNK]": 0, " ": 1, ".": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    tok = Tokenizer(token_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    tokenizer.chat_template = TEMPLATE
    assert tokenizer.eos_token_id == VOCAB
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4,
                       num_sinks=1)  # fmt: skip
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    args = ["--model", str(checkpoint), "--served-model-name", MODEL, "--api-key", KEY,
            "--compile", "0", "--max-num-seqs", "2", "--max-num-batched-tokens", "64",
            "--prefill-chunk-size", "16"]  # fmt: skip
    server = ServeProcess(args, {"OMP_NUM_THREADS": "1"}).wait_ready(180)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def driver(base_url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        # the key as if typed in an earlier visit: the first load then asks nothing unauthorized
        browser.get(f"{base_url}/static/favicon.svg")
        browser.execute_script(f"sessionStorage.setItem('lln-serve-api-key', '{KEY}')")
        browser.get(base_url)
        _wait(lambda: _text(browser, "model-name") == MODEL, 30, "the page found no model")
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def page(driver):
    """The page, on a new conversation, greedy and short; no console error when done."""
    driver.find_element("id", "reset").click()
    _set(driver, temperature="0", max_tokens="12", top_k="0", top_p="1")
    yield driver
    assert _console_errors(driver) == []


def test_the_page_loads_without_console_errors(page):
    assert _text(page, "health") == "ready"
    assert "B" in _text(page, "state-bytes")  # the state's size, from /v1/state_info
    assert page.find_element("id", "chart").get_attribute("data-turns") == "0"


def test_a_message_streams_an_answer_into_the_chat(page):
    _set(page, max_tokens="60")
    page.execute_script(
        "window.lengths = []; new MutationObserver(() => {"
        " const items = document.querySelectorAll('#messages li.assistant');"
        " if (items.length) window.lengths.push(items[items.length - 1].firstChild.length);"
        "}).observe(document.getElementById('messages'), {subtree: true, characterData: true,"
        " childList: true});"
    )
    answer = _send(page, "hello")
    lengths = page.execute_script("return window.lengths")
    assert len(set(lengths)) >= 5, lengths  # the answer grew piece by piece
    assert len(answer) >= 5
    assert _text(page, "generated") == "60"
    assert _text(page, "ttft").endswith("ms") or _text(page, "ttft").endswith(" s")
    assert float(_text(page, "tps")) > 0


def test_stop_cancels_the_answer_and_frees_the_slot(page, base_url):
    _set(page, max_tokens="20000")
    _type(page, "count to a million")
    page.find_element("id", "send").click()
    _wait(lambda: len(_last_answer(page)) > 10, 30, "no text streamed")
    assert _gauge(base_url, "lln:num_requests_running") == 1
    page.find_element("id", "stop-button").click()
    _wait(lambda: _gauge(base_url, "lln:num_requests_running") == 0, 10, "the slot is held")
    assert _gauge(base_url, "lln:state_slots_used") == 0
    last = page.find_elements("css selector", "#messages li.assistant")[-1]
    assert "cancelled" in last.get_attribute("class")
    assert page.find_element("id", "send").is_enabled()
    assert not page.find_element("id", "stop-button").is_enabled()


def test_a_session_prefills_only_new_text_and_the_state_stays_flat(page, base_url):
    assert page.find_element("id", "session").is_selected()
    turns = []
    for text in ("hello there", "how are you", "tell me more"):
        _send(page, text)
        turns.append({k: int(_text(page, k).split()[0]) for k in ("prefilled", "cached",
                                                                   "context")})  # fmt: skip
    wrapped = [len(f"<user>{t}<assistant>") for t in ("hello there", "how are you", "tell me more")]
    assert turns[0] == {"prefilled": wrapped[0], "cached": 0, "context": wrapped[0] + 12}
    for i in (1, 2):
        # the new message (and the last answer's final token, which the state has not seen)
        assert turns[i]["prefilled"] == wrapped[i] + 1
        assert turns[i]["cached"] == turns[i - 1]["context"] - 1
        assert turns[i]["context"] == turns[i - 1]["context"] + wrapped[i] + 12
    info = httpx.get(f"{base_url}/v1/state_info", headers={"Authorization": f"Bearer {KEY}"})
    info = info.json()
    points = {
        series: [
            (int(c.get_attribute("data-tokens")), int(c.get_attribute("data-bytes")))
            for c in page.find_elements("css selector", f"#chart circle[data-series='{series}']")
        ]
        for series in ("state", "kv")
    }
    assert [tokens for tokens, _ in points["state"]] == [t["context"] for t in turns]
    assert {b for _, b in points["state"]} == {info["state_bytes_per_sequence"]}  # flat
    kv = [b for _, b in points["kv"]]
    assert kv == [t["context"] * info["kv_cache_bytes_per_token"] for t in turns]
    assert kv[0] < kv[1] < kv[2]  # grows


def test_raw_completion_without_a_session_charts_each_prompt(page, base_url):
    page.find_element("css selector", "input[name='mode'][value='completion']").click()
    page.find_element("id", "session").click()  # off: every request stands alone
    try:
        answer = _send(page, "abc")
        assert len(answer) >= 1 and _text(page, "context") == f"{3 + 12} tokens"
        assert _text(page, "cached") == "0" and _text(page, "prefilled") == "3"
        kv = page.find_element("css selector", "#chart circle[data-series='kv']")
        info = httpx.get(f"{base_url}/v1/state_info", headers={"Authorization": f"Bearer {KEY}"})
        assert int(kv.get_attribute("data-bytes")) == 15 * info.json()["kv_cache_bytes_per_token"]
    finally:
        page.find_element("id", "session").click()
        page.find_element("css selector", "input[name='mode'][value='chat']").click()


def test_a_text_file_as_context_fills_the_prefill_bar(page, tmp_path):
    """A dropped file becomes the context; so does a picked one, sent before the next message
    with return_progress: the bar (16-token prefill chunks here) rises to the prompt's length."""
    page.execute_script(
        "const data = new DataTransfer();"
        "data.items.add(new File(['dropped text'], 'dropped.txt', {type: 'text/plain'}));"
        "window.dispatchEvent(new DragEvent('drop', {dataTransfer: data, cancelable: true}));"
    )
    _wait(lambda: "dropped.txt: 12 characters" in _text(page, "context-status"), 10, "no drop")
    page.find_element("id", "context-clear").click()
    text = "a long report about foxes and dogs. " * 40  # 1,440 characters
    (tmp_path / "report.txt").write_text(text)
    page.find_element("id", "context-file").send_keys(str(tmp_path / "report.txt"))
    _wait(lambda: "report.txt: 1,440 characters" in _text(page, "context-status"), 10, "no file")
    page.execute_script(
        "window.values = []; const bar = document.getElementById('prefill-bar');"
        "new MutationObserver(() => window.values.push(bar.value))"
        ".observe(bar, {attributes: true, attributeFilter: ['value']});"
    )
    _send(page, "what is it about")
    total = len(f"<user>{text}\n\nwhat is it about<assistant>")
    values = page.execute_script("return window.values")
    assert len(values) > 50 and values == sorted(values) and values[-1] == total, values
    bar = page.find_element("id", "prefill-bar")
    assert bar.get_attribute("max") == str(total) and bar.get_attribute("value") == str(total)
    shown = _text(page, "prefill-text")
    assert f"{total:,} / {total:,} tokens (100%)" in shown and "tok/s" in shown, shown
    assert _text(page, "prefilled") == str(total)
    question = page.find_elements("css selector", "#messages li.user")[-1]
    assert question.text.startswith("what is it about") and "report.txt" in question.text
    assert _text(page, "context-status") == ""  # sent: the session holds it now
    assert page.find_element("id", "context-text").get_attribute("value") == ""


def test_the_page_asks_for_the_key_and_shows_nothing_without_it(driver, base_url):
    driver.execute_script("sessionStorage.clear()")
    driver.get(base_url)
    _wait(lambda: "API key required" in _text(driver, "model-name"), 20, "no key asked for")
    assert _text(driver, "state-bytes") == "-" and MODEL not in driver.page_source
    errors = _console_errors(driver)
    assert errors and all("401" in e["message"] for e in errors), errors
    field = driver.find_element("id", "api-key")
    field.send_keys(KEY)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
    _wait(lambda: _text(driver, "model-name") == MODEL, 20, "the key was not used")
    assert _console_errors(driver) == []


# ---- helpers ------------------------------------------------------------------------------------


def _wait(condition, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(message)


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def _set(driver, **fields: str) -> None:
    for name, value in fields.items():
        driver.execute_script(
            "document.getElementById(arguments[0]).value = arguments[1]", name, value
        )


def _type(driver, text: str) -> None:
    prompt = driver.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(text)


def _last_answer(driver) -> str:
    return driver.execute_script(
        "const a = document.querySelectorAll('#messages li.assistant');"
        "return a.length ? a[a.length - 1].firstChild.textContent : ''"
    )


def _send(driver, text: str) -> str:
    """Send a message and wait for its answer's figures; the answer's text."""
    before = len(driver.find_elements("css selector", "#messages li.assistant .meta"))
    _type(driver, text)
    driver.find_element("id", "send").click()
    _wait(
        lambda: len(driver.find_elements("css selector", "#messages li.assistant .meta")) > before,
        60, "no answer",
    )  # fmt: skip
    return _last_answer(driver)


def _console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _gauge(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")
