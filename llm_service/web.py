"""The chat page: `GET /` and `GET /chat` serve a self-contained page that talks to `/ws/llm`.

The page is three plain files under `llm_service/static/` (HTML, CSS, JavaScript), with no
build step and nothing fetched from elsewhere, so it works on a host with no internet. They
are read from disk on each request (they are small) and sent with an ETag, `no-cache` so a
browser revalidates and sees an updated file at once, and a Content-Security-Policy that lets
the page load only its own files and open WebSockets; only the three files are served.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

router = APIRouter()

STATIC_DIR = Path(__file__).with_name("static")

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self' ws: wss:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_ASSETS = {
    "chat.css": "text/css; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
}


# Plain `def` handlers: FastAPI runs them on its thread pool, so reading a file never blocks
# the event loop that streams tokens.
@router.get("/", include_in_schema=False)
@router.get("/chat", include_in_schema=False)
def chat_page(request: Request) -> Response:
    """The chat page."""
    return _serve("chat.html", "text/html; charset=utf-8", request)


@router.get("/static/{name}", include_in_schema=False)
def static_asset(name: str, request: Request) -> Response:
    """The page's stylesheet and script; any other name is 404."""
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail="not found")
    return _serve(name, media_type, request)


def _serve(name: str, media_type: str, request: Request) -> Response:
    body = (STATIC_DIR / name).read_bytes()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {**_HEADERS, "ETag": etag}
    offered = request.headers.get("if-none-match", "")
    if etag in (tag.strip().removeprefix("W/") for tag in offered.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)
