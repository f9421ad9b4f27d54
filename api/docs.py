"""The interactive API docs, served offline: ``/docs`` (Swagger UI) loads its script,
stylesheet and icon from ``/docs/static``, the copies that the ``fastapi-offline``
package ships, never from a CDN. ``CRMFLOW_API_DOCS=false`` turns the page off
(``/openapi.json`` stays). There is no ``/redoc``: ReDoc's bundle loads its logo from
its vendor's CDN whatever it is told.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
DOCS_URL = "/docs"
STATIC_URL = "/docs/static"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# Swagger UI would otherwise ask validator.swagger.io about the schema (an image badge).
SWAGGER_PARAMETERS = {"validatorUrl": None}


def install(app: FastAPI) -> None:
    """``/docs`` and its assets on ``app`` (made with ``docs_url=None, redoc_url=None``,
    so FastAPI's CDN pages are not there)."""
    if not (ASSETS / "swagger-ui-bundle.js").is_file():  # pragma: no cover - a broken install
        raise RuntimeError(f"the Swagger UI assets are missing from {ASSETS}")
    app.mount(STATIC_URL, StaticFiles(directory=ASSETS), name="docs-static")

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(
            openapi_url=f"{base}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{base}{OAUTH2_REDIRECT_URL}",
            swagger_js_url=f"{base}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{base}{STATIC_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
