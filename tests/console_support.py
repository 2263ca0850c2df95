"""What the console tests share: the test app's authorize (a cookie says who looks) and a
headless Debian Chromium driven by Selenium (no browser download: the system's binaries)."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

from outbound_heartbeat.console import HttpRequest, Viewer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def viewer_from_cookie(request: Any) -> Viewer | None:
    """The tests' authorize: the cookie ``viewer`` says who looks (op, ro, biz:N)."""
    if not isinstance(request, HttpRequest):
        return None
    raw = request.cookies.get("viewer", "")
    if raw == "op":
        return Viewer(operator=True, name="ops")
    if raw == "ro":
        return Viewer(operator=True, read_only=True, name="auditor")
    if raw.startswith("biz:") and raw[4:].isdigit():
        return Viewer(business_id=int(raw[4:]), name=f"user-{raw[4:]}")
    return None


class Browser:
    """A fresh headless Chromium profile; ``quit()`` removes it."""

    def __init__(self, width: int = 1360, height: int = 760) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="oh-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
            "--lang=en-US",
        ):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
