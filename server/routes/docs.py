"""GET /openapi.json, /docs and /redoc: the API's description, behind the API key like the API.

With ``[server] api_keys`` set, a browser cannot open /docs (it sends no bearer header); fetch
/openapi.json with the key instead.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from mlxserve.server.deps import require_api_key

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_api_key)])


def _schema_url(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=_schema_url(request), title="mlxserve - docs")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=_schema_url(request), title="mlxserve - ReDoc")
