"""A real browser for the report tests: Debian's Chromium, driven by Selenium through its
chromedriver (``apt-get install chromium chromium-driver``; ``.ci/run`` installs them).

Tests that need it take the ``browser`` fixture (tests/conftest.py), which skips them, saying
why, where no browser is installed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


def missing() -> str | None:
    """Why no browser test can run here, or None when one can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not any(shutil.which(name) for name in CHROMIUM):
        return "no Chromium: apt-get install chromium chromium-driver (.ci/run does)"
    if not shutil.which(DRIVER):
        return "no chromedriver: apt-get install chromium-driver (.ci/run does)"
    return None


class Browser:
    """One headless Chromium for a test session; ``open`` loads a file and says what went wrong."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="camlens-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = next(shutil.which(n) for n in CHROMIUM if shutil.which(n))
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", f"--user-data-dir={self.profile}",
                         "--disable-extensions", "--no-first-run", "--disable-background-networking"):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(shutil.which(DRIVER)), options=options)
        self.driver.set_page_load_timeout(60)

    def open(self, path: Path, width: int = 1280, height: int = 900) -> None:
        self.driver.set_window_size(width, height)
        self.driver.get(Path(path).resolve().as_uri())
        self.console()  # start each page with an empty log

    def console(self) -> list[dict]:
        """The browser console's entries since the last call."""
        return self.driver.get_log("browser")

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions since the last call."""
        return [entry["message"] for entry in self.console() if entry["level"] in ("SEVERE", "ERROR")]

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def cut_off(self) -> list[str]:
        """What a reader cannot see nor scroll to: the page wider than the window, and each visible
        table (by id) whose right edge passes the window without a scrolling box of its own that
        fits in it."""
        return self.js("""
            var found = [], width = document.documentElement.clientWidth;
            if (document.documentElement.scrollWidth > width + 1) found.push("the page");
            document.querySelectorAll("table").forEach(function (table, i) {
              if (!table.getClientRects().length) return;
              var name = table.id || ("table " + i);
              var box = table.closest(".scroll");
              if (box) {
                var rect = box.getBoundingClientRect();
                if (rect.right > width + 1) found.push(name + ": its scrolling box passes the window");
              } else if (table.getBoundingClientRect().right > width + 1) {
                found.push(name);
              }
            });
            return found;""")

    def broken_images(self) -> list[str]:
        """Images shown on the page that did not load (data-ref or the start of their src)."""
        return self.js("""
            return Array.from(document.images)
              .filter(img => !img.hidden && img.getClientRects().length &&
                             !(img.complete && img.naturalWidth > 0))
              .map(img => img.getAttribute('data-ref') || (img.src || '').slice(0, 40));""")

    def store_loads(self) -> list[str]:
        """References of the page's image store that do not decode: every picture, shown or not."""
        return self.driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const store = window.camlens.store, bad = [];
            Promise.all(Object.keys(store).map(ref => new Promise(resolve => {
              const img = new Image();
              img.onload = () => resolve(img.naturalWidth > 0 || bad.push(ref));
              img.onerror = () => resolve(bad.push(ref));
              img.src = store[ref];
            }))).then(() => done(bad));""")

    def screenshot(self, path: Path) -> Path:
        self.driver.save_screenshot(str(path))
        return path

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
