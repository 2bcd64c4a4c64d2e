"""A headless Chromium for looking at the report as a reader would.

Drives the system's Chromium (Debian package ``chromium``) through
Playwright; Playwright's own browser download is never used. The page is
opened from a ``file://`` URL with every other request refused and
recorded, so a page that needs the network is caught.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["CHROMIUM_ENV_VAR", "BrowserUnavailable", "find_chromium", "open_page", "screenshot"]

CHROMIUM_ENV_VAR = "WASSERSTEIN_BENCH_CHROMIUM"
"""Path of the Chromium binary, when it is not ``chromium`` on the PATH."""

_FLAGS = [
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


class BrowserUnavailable(RuntimeError):
    """No Chromium or no Playwright: the message says what to install."""


def find_chromium() -> str | None:
    """The Chromium binary: ``$WASSERSTEIN_BENCH_CHROMIUM``, else the first of chromium, chromium-browser on the PATH."""
    configured = os.environ.get(CHROMIUM_ENV_VAR)
    if configured:
        return configured if Path(configured).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def open_page(path: str | os.PathLike, width: int = 1400, height: int = 1000) -> Iterator[tuple[object, list[str]]]:
    """Open a local HTML file; yields the Playwright page and the list of refused non-local requests."""
    executable = find_chromium()
    if executable is None:
        raise BrowserUnavailable(
            f"no Chromium found: install it (Debian: apt-get install chromium) or set {CHROMIUM_ENV_VAR} to its path"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise BrowserUnavailable("Playwright is not installed: pip install playwright (no browser download needed)") from error
    # Chromium refuses its sandbox when run as root, as in containers and CI.
    flags = _FLAGS + (["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
    refused: list[str] = []

    def only_local(route):
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=flags, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.route("**/*", only_local)
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            yield page, refused
        finally:
            browser.close()


def screenshot(path: str | os.PathLike, png: str | os.PathLike, width: int = 1400, height: int = 1000) -> Path:
    """Save a PNG of the top ``width`` x ``height`` of a local HTML page."""
    with open_page(path, width, height) as (page, _):
        page.screenshot(path=str(png))
    return Path(png)
