"""Screenshot a neuron page with one examples list open, for the README.

    python docs/screenshot.py --db data/demo.duckdb --neuron 17.1284 --quadrant nn --hook hook_post \
        --out docs/neuron-page.png
    python docs/screenshot.py --db data/demo.duckdb --neuron 17.1284 --quadrant nn --distributions \
        --out docs/distributions.png

--distributions shows the lazy distributions section instead, with the quadrant's typical interval open.

Starts the real app on a free port and drives Debian's headless Chromium.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--neuron", required=True, help="layer.neuron")
    ap.add_argument("--quadrant", default="nn")
    ap.add_argument("--hook", default="hook_post")
    ap.add_argument("--out", type=Path, default=Path("docs/neuron-page.png"))
    ap.add_argument("--distributions", action="store_true", help="the histograms, density and one interval's examples")
    args = ap.parse_args()

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from gluscope.server.app import create_app

    app = create_app([args.db])
    model = next(iter(app.state.registry))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_window_size(1280, 1000)
        layer, neuron = args.neuron.split(".")
        driver.get(f"http://127.0.0.1:{port}/models/{model}/neurons/{layer}/{neuron}")
        if args.distributions:
            _distributions(driver, args.quadrant, By, WebDriverWait)
        else:
            _one_list(driver, args.quadrant, args.hook, By, WebDriverWait)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, min(height + 40, 2300))
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.should_exit = True


def _distributions(driver, quadrant: str, By, WebDriverWait) -> None:
    """Keep the header and the distributions section, with the quadrant's first interval's examples open."""
    WebDriverWait(driver, 20).until(lambda _: driver.find_elements(By.CSS_SELECTOR, f"#hist-{quadrant} svg a.interval"))
    driver.find_element(By.CSS_SELECTOR, f"#hist-{quadrant} svg a.interval").click()
    WebDriverWait(driver, 20).until(lambda _: driver.find_elements(By.CSS_SELECTOR, ".dist-examples .snippet"))
    driver.execute_script(
        "document.querySelectorAll('main > section').forEach(s => {"
        "  if (!s.classList.contains('distributions') && !s.classList.contains('summary')) s.remove(); });")


def _one_list(driver, quadrant: str, hook: str, By, WebDriverWait) -> None:
    section = driver.find_element(By.ID, f"ex-{quadrant}-{hook}")
    driver.execute_script("arguments[0].scrollIntoView()", section)
    section.find_element(By.TAG_NAME, "summary").click()
    WebDriverWait(driver, 10).until(lambda _: section.find_elements(By.CSS_SELECTOR, ".snippet"))
    # Keep the header, Figure 1, the weight tokens and the one open list in the picture.
    driver.execute_script(
        "document.querySelectorAll('section.quadrant').forEach(s => { if (!s.contains(arguments[0])) s.remove(); });"
        "arguments[0].parentElement.querySelectorAll('details.ex-section').forEach(d => {"
        "  if (d !== arguments[0]) d.remove(); });", section)


if __name__ == "__main__":
    main()
