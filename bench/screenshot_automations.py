"""The README's screenshot of the Prefect UI's automations page: a fresh
server, one alert added by `denoise alerts add`, the page shot by Chromium
(Debian's, driven by Playwright). Run from the project folder:
``python bench/screenshot_automations.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.servers import PrefectServer  # noqa: E402

OUT = REPO / "docs" / "img" / "automations.png"


def main() -> None:
    from playwright.sync_api import sync_playwright

    server = PrefectServer(Path(tempfile.mkdtemp(prefix="denoise-shot-")) / "server")
    try:
        url = server.wait_healthy()
        env = {**os.environ, "PREFECT_API_URL": url, "PYTHONPATH": str(REPO)}
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "alerts", "add", "--name", "ops"]
            + ["--webhook", "https://hooks.example.com/denoise"],
            env=env,
            check=True,
        )
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            page.goto(url.removesuffix("/api") + "/automations")
            page.get_by_text("denoise-alerts-ops: gate").wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(OUT))
            browser.close()
        print(f"saved {OUT}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
