"""The public listener's pages: the chat page at `/` (static files in http/static, served by us,
nothing from any other host) or, with CHAT_PAGE=off, a status page. Both show the model, whether it
is online and why not; the chat page keeps that header current from `/health` itself."""

from __future__ import annotations

import html
import time
from functools import cache
from importlib import resources
from typing import Any

from watchdog_llm.availability import Availability

# No inline script or style, nothing from elsewhere: a reply that slipped markup into the page could
# run nothing, load nothing and send nothing anywhere but here.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
ASSETS = {"chat.js": "text/javascript", "markdown.js": "text/javascript", "chat.css": "text/css"}


@cache
def asset(name: str) -> bytes:
    """One of ASSETS, as shipped in the package."""
    return resources.files("watchdog_llm.http").joinpath("static", name).read_bytes()


def _header(info: dict[str, Any], a: Availability) -> dict[str, str]:
    since = info.get("since")
    return {
        "model": html.escape(str(info.get("model") or "model")),
        "state": "online" if a.serving else "offline",
        "since": html.escape(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(since)) if since else "unknown"),
        "why": "" if a.serving else html.escape(f"{a.message}."),
    }


def chat_page(info: dict[str, Any], a: Availability) -> str:
    h = _header(info, a)
    page = asset("chat.html").decode()
    for name in ("model", "state", "since", "why"):
        page = page.replace("{{" + name + "}}", h[name])
    return page.replace("{{away_hidden}}", " hidden" if a.serving else "")


def status_page(info: dict[str, Any], a: Availability) -> str:
    h = _header(info, a)
    why = f"<p>{h['why']}</p>" if h["why"] else ""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>watchdog-llm</title>"
        "<meta name='viewport' content='width=device-width'><link rel='stylesheet' href='/_chat/chat.css'></head>"
        f"<body><header><h1>{h['model']}</h1><span id='state' class='{h['state']}'>{h['state']}</span>"
        f"<span id='since'>since {h['since']}</span></header><main id='status'>{why}"
        "<p>OpenAI-compatible API at <code>/v1</code> (an API key is needed).</p></main></body></html>"
    )
