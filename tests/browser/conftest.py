"""A real headless Chromium (Debian's `chromium` and `chromium-driver`, which `.ci/run`
installs), driven by selenium, and the web pages it loads: served from another
origin than Eddy's (`pages`), as a frontend on its own port would be.

Every test here is marked `browser`, and skipped, saying why, only when no
Chromium or ChromeDriver is installed. Selenium's calls block, so they run in a
worker thread (`Browser`): the servers under test share this event loop.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.feeds import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PAGES = Path(__file__).parent / "pages"
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # as root, in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # a closed network: no background connections that fail and slow the browser
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def chromium() -> Iterator[webdriver.Chrome]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "no Chromium: install Debian's chromium and chromium-driver"
            " (`apt-get install chromium chromium-driver`, as .ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="eddy-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


class Browser:
    """The browser, from async tests: each call in a worker thread."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    async def open(self, url: str) -> None:
        await anyio.to_thread.run_sync(self.driver.get, url)

    async def run(self, script: str, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(lambda: self.driver.execute_script(script, *args))

    async def until(self, script: str, ok: Callable[[Any], bool], within_s: float = 15) -> Any:
        """Run `script` until `ok(its result)`; the result. Fails after `within_s`."""
        delay = 0.02
        with anyio.fail_after(within_s):
            while not ok(result := await self.run(script)):
                await anyio.sleep(delay)
                delay = min(delay * 1.5, 0.25)
        return result

    async def screenshot(self, path: Path) -> None:
        await anyio.to_thread.run_sync(self.driver.save_screenshot, str(path))


@pytest.fixture
def browser(chromium: webdriver.Chrome) -> Browser:
    return Browser(chromium)


async def page(request: Any) -> HTMLResponse:
    return HTMLResponse((PAGES / request.path_params["name"]).read_text())


@pytest.fixture
async def pages() -> AsyncIterator[int]:
    """The port of a server of `tests/browser/pages/` (`/pages/<name>`): its pages'
    origin is `http://127.0.0.1:<port>` or `http://localhost:<port>`, not Eddy's."""
    app = Starlette(routes=[Route("/pages/{name}", page)])
    async with serve(app) as url:
        yield int(url.rsplit(":", 1)[1])
