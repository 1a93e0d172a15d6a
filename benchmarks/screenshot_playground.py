"""Screenshot of the playground (README): headless chromium talks to a running `lln-serve serve`
(the real default model), holds a short conversation with sessions on, saves a PNG.

    lln-serve serve &   # wait for /health 200
    python benchmarks/screenshot_playground.py --url http://127.0.0.1:8000 --out docs/playground.png
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

TURNS = (
    "What is the capital of France?",
    "Name two famous museums there.",
    "Which one holds the Mona Lisa?",
)


def open_page(url: str, api_key: str | None) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,980", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    if api_key:
        driver.get(f"{url}/static/favicon.svg")
        driver.execute_script("sessionStorage.setItem('lln-serve-api-key', arguments[0])", api_key)
    driver.get(url)
    wait(lambda: driver.find_element("id", "health").text == "ready", 600)
    wait(lambda: driver.find_element("id", "state-bytes").text != "-", 30)
    return driver


def converse(driver: webdriver.Chrome, turns: tuple[str, ...], max_tokens: int) -> None:
    driver.execute_script(
        "document.getElementById('temperature').value = '0';"
        "document.getElementById('max_tokens').value = arguments[0];",
        str(max_tokens),
    )
    done = "#messages li.assistant .meta"
    for number, text in enumerate(turns, 1):
        prompt = driver.find_element("id", "prompt")
        prompt.send_keys(text)
        driver.find_element("id", "send").click()
        wait(lambda n=number: len(driver.find_elements("css selector", done)) >= n, 300)
        print(f"turn {number}: context {driver.find_element('id', 'context').text}, "
              f"cached {driver.find_element('id', 'cached').text}, "
              f"{driver.find_element('id', 'tps').text} tok/s")  # fmt: skip


def wait(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not get there in time")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    driver = open_page(args.url, args.api_key)
    try:
        converse(driver, TURNS, args.max_tokens)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        print(f"saved {args.out}; console errors: {errors or 'none'}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
