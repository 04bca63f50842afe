"""The README's picture of the playground (docs/playground.png): `lorablend serve --demo`'s page in Debian's headless
Chromium, with the drawing model's `stripes` and `sks` LoRAs blended at 0.7 / 0.8 beside the base.

    .venv/bin/python scripts/screenshot_playground.py docs/playground.png
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from lorablend import DiffusionPipeline
from lorablend.fixtures.drawing_model import DRAWING_DIR, base_dir
from lorablend.serve import ServeSettings, create_app


def main(out: str) -> None:
    pipe = DiffusionPipeline.from_pretrained(str(base_dir()))
    app = create_app(pipe, ServeSettings(lora_dir=DRAWING_DIR / "loras", token="demo"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8765, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,860",
                 "--disable-background-networking", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get("http://127.0.0.1:8765/")
        token = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "token"))
        token.send_keys("demo", Keys.ENTER)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "use-sks.diffusers"))
        for name, lefts in (("stripes.kohya", 6), ("sks.diffusers", 4)):
            driver.find_element(By.ID, f"use-{name}").send_keys(Keys.SPACE)
            driver.find_element(By.ID, f"w-{name}").send_keys(*[Keys.ARROW_LEFT] * lefts)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a yellow sks on a blue background")
        driver.find_element(By.ID, "compare").send_keys(Keys.SPACE)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history .thumb"))
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(out)
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/playground.png")
