"""The web page's files without a browser: served as shipped, asking for nothing outside the
server (no other host, no HTML sinks); / answers JSON to API clients and sends browsers to /ui.
(The page in Chromium: browser/test_web_ui.py.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..support import REPO
from ..support.server import RunningServer, running_server, write_config
from ..support.web_ui import BROWSER_ACCEPT, two_models

STATIC = REPO / "server" / "static"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path]
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("web")
    with running_server(write_config(tmp, two_models(tmp, tiny_checkpoints))) as running:
        yield running


def test_page_files_ask_for_nothing_outside_the_server(server: RunningServer) -> None:
    page = httpx.get(server.url + "/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path in sorted(STATIC.iterdir()):
        served = httpx.get(f"{server.url}/ui/static/{path.name}")
        assert served.status_code == 200 and served.content == path.read_bytes()
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(https?:)?//[\w.-]+\.\w", text), f"{path.name} names another host"
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink not in text, f"{path.name} uses {sink}"
    assert (
        httpx.get(server.url + "/ui/static/app.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert httpx.get(server.url + "/ui/static/nope.js").status_code == 404
    assert httpx.get(server.url + "/ui/static/..%2Fapp.py").status_code == 404


def test_root_answers_json_to_api_clients_and_sends_browsers_to_the_page(
    server: RunningServer,
) -> None:
    for accept in (None, "*/*", "application/json", "application/json, text/html;q=0.5"):
        headers = {"Accept": accept} if accept else {}
        response = httpx.get(server.url + "/", headers=headers)
        assert response.status_code == 200 and response.json()["name"] == "mlxserve", accept
    for accept in (BROWSER_ACCEPT, "text/html", "text/*, application/json;q=0.9"):
        response = httpx.get(server.url + "/", headers={"Accept": accept})
        assert response.status_code == 307 and response.headers["location"] == "/ui", accept
