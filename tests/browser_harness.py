"""Debian's Chromium driven by Playwright, for the page tests (chat page, dashboard)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Playwright

# Debian's: headless-shell (no GTK, half the memory, what Playwright itself runs headless), else the full one.
CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium") or "/usr/bin/chromium-headless-shell"
REQUIRED = os.environ.get("WATCHDOG_LLM_REQUIRE_BROWSER") == "1"  # CI: a missing browser fails, never skips
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "images"
needs_browser = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not REQUIRED, reason="no Chromium: apt-get install chromium-headless-shell"
)


def launch(p: Playwright) -> Browser:
    if not os.path.exists(CHROMIUM):
        pytest.fail("no Chromium: apt-get install chromium-headless-shell (.ci/run does)")
    return p.chromium.launch(executable_path=CHROMIUM)  # Playwright adds --no-sandbox (we are root)


def screenshot(page: Page, name: str) -> None:
    """README's pictures: `make screenshots` runs the page tests with WATCHDOG_LLM_SCREENSHOTS=1."""
    if os.environ.get("WATCHDOG_LLM_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / name))
