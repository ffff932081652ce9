"""GET /ui: the web page (chat, cluster view, models), and its files under /ui/static/.

The files hold no data: every figure on the page comes from API calls that carry the user's
key, so they are served without one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Everything comes from this server: no CDN, no inline script, no framing.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


# Only these names are ever looked up on disk: nothing a request sends reaches the file system.
FILES = {path.name for path in STATIC.iterdir() if path.suffix in MEDIA_TYPES}


def _file(name: str) -> FileResponse:
    if name not in FILES:
        raise HTTPException(404, "no such file in the web page")
    path = STATIC / name
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


def _quality(accept: str, media_type: str) -> float:
    """The q-value ``accept`` gives ``media_type``, from its most specific matching range."""
    kind = media_type.split("/")[0]
    specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}
    best, best_rank = 0.0, -1
    for item in accept.lower().split(","):
        media_range, *params = (part.strip() for part in item.split(";"))
        rank = specificity.get(media_range, -1)
        if rank <= best_rank:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        best, best_rank = quality, rank
    return best


def prefers_html(request: Request) -> bool:
    """Whether the client (a browser, typically) would rather have HTML than JSON."""
    accept = request.headers.get("accept", "")
    return _quality(accept, "text/html") > _quality(accept, "application/json")


def page_redirect(request: Request) -> RedirectResponse:
    url = request.scope.get("root_path", "").rstrip("/") + "/ui"
    return RedirectResponse(url, status_code=307, headers={"Vary": "Accept"})


@router.get("/ui")
async def page() -> FileResponse:
    return _file("index.html")


@router.get("/ui/static/{name}")
async def static_file(name: str) -> FileResponse:
    return _file(name)
