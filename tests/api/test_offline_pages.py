"""Everything the app serves works offline: no page (the API docs, every dashboard page)
loads a script, a stylesheet, a font or an image from another host, and the assets they
do load are served by the app itself. (tests/api/test_dashboard.py loads /docs in Chromium
with every request to another host blocked.)"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import psycopg

from tests.helpers import SEED_QUALIFY

BASE = "http://testserver"
# Any absolute URL in a page: in a tag's attribute, inline CSS (url(...), @import) or an
# inline script (Swagger UI's and ReDoc's loaders).
ABSOLUTE = re.compile(r"""(?:https?:)?//[A-Za-z0-9.-]+(?::\d+)?""")


class Resources(HTMLParser):
    """The URLs a page makes the browser load: script src, link href, img/iframe src..."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for attr in ("src", "href", "srcset", "data", "poster", "style"):
            value = values.get(attr)
            if value is None or (tag == "a" and attr == "href"):  # links are not loads
                continue
            if attr == "style":
                self.inline.append(value)
            else:
                self.urls.append(value)
        self._in = tag if tag in ("script", "style") else None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.inline.append(data)

    def handle_endtag(self, tag: str) -> None:
        self._in = None


def foreign(url: str) -> bool:
    parts = urlsplit(urljoin(BASE + "/", url))
    return parts.scheme not in ("http", "https", "") or parts.netloc != "testserver"


def check_offline(path: str, html: str) -> list[str]:
    """The page's own-host resources; fails on any reference to another host."""
    parser = Resources()
    parser.feed(html)
    loads = [u for u in parser.urls if not u.startswith(("data:", "#"))]
    assert [u for u in loads if foreign(u)] == [], f"{path} loads from another host"
    for text in parser.inline:
        hosts = [m for m in ABSOLUTE.findall(text) if urlsplit(m).netloc != "testserver"]
        assert hosts == [], f"{path}: inline script or style names {hosts}"
    return loads


async def test_no_page_loads_anything_from_another_host(
    api_app: Any,
    api_keys: dict[str, str],
    client: httpx.AsyncClient,
    crm: psycopg.AsyncConnection[Any],
) -> None:
    created = await client.post("/workflows", json=SEED_QUALIFY)
    assert created.status_code == 201
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api_app), base_url=BASE, follow_redirects=False
    ) as browser:
        pages = ["/docs", "/docs/oauth2-redirect", "/ui/login"]
        # No ReDoc: its bundle fetches its logo from its vendor's CDN whatever it is told.
        assert (await browser.get("/redoc")).status_code == 404
        assets: set[str] = set()
        for path in pages:
            response = await browser.get(path)
            assert response.status_code == 200, path
            assets |= set(check_offline(path, response.text))
        login = await browser.post(
            "/ui/login", data={"key": api_keys["read"]}, headers={"Origin": BASE}
        )
        assert login.status_code == 303
        for path in ("/ui", "/ui/workflows", "/ui/executions", "/ui/failures", "/ui/sla"):
            response = await browser.get(path + "")
            assert response.status_code == 200, path
            assets |= set(check_offline(path, response.text))
        response = await browser.get("/ui/latency")
        assets |= set(check_offline("/ui/latency", response.text))

        # Swagger UI comes from the app, and so does everything else they name.
        assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
        assert any(a.endswith("swagger-ui.css") for a in assets)
        for asset in sorted(assets):
            fetched = await browser.get(urljoin(BASE + "/", asset))
            assert fetched.status_code == 200, asset
            assert len(fetched.content) > 0, asset


async def test_the_docs_can_be_turned_off(
    settings: Any, pool: Any, conn: psycopg.AsyncConnection[Any]
) -> None:
    from api.main import create_app

    app = create_app(settings.model_copy(update={"api_docs": False}), pool=pool)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c,
    ):
        for path in ("/docs", "/docs/oauth2-redirect", "/docs/static/swagger-ui.css"):
            assert (await c.get(path)).status_code == 404, path
        # The OpenAPI document itself stays: clients generate code from it.
        assert (await c.get("/openapi.json")).status_code == 200
