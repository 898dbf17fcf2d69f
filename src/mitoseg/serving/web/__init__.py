"""The web page of the endpoint: one static HTML + JS page served by the Bento service.

:func:`ui_app` is a Starlette app the service mounts at :data:`UI_PATH`
(``MitoSeg.mount_asgi_app``): ``GET /ui/`` is ``index.html`` and ``GET /ui/sample.png`` a
bundled real EM slice (Drosophila VNC, CC BY-NC-SA, the first test slice of
``sample_data/vnc``). The page itself talks to the service's own API: ``POST /preview``
(the upload as an 8-bit PNG, since browsers do not display TIFF), ``POST /segment`` (the
mask, PNG) and ``POST /stats`` (count and measurement table); an API token, when the
service has one, is typed into the page and sent as ``Authorization: Bearer``. The page
and the sample are open (no token), like the API docs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["SAMPLE_FILE", "UI_PATH", "WEB_DIR", "ui_app"]

#: Where the service mounts the page.
UI_PATH = "/ui"
#: Folder holding ``index.html`` and the sample image (package data).
WEB_DIR = Path(__file__).resolve().parent
#: The bundled sample slice.
SAMPLE_FILE = "sample.png"


def ui_app() -> Any:
    """The Starlette app serving the page and the sample (mounted at :data:`UI_PATH`)."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, RedirectResponse
    from starlette.routing import Route

    index = WEB_DIR / "index.html"
    sample = WEB_DIR / SAMPLE_FILE

    async def page(request: Any) -> Any:
        if not request.url.path.endswith("/"):  # relative links need the trailing slash
            return RedirectResponse(str(request.url.replace(path=request.url.path + "/")))
        return FileResponse(index, media_type="text/html; charset=utf-8")

    async def sample_png(request: Any) -> Any:
        return FileResponse(sample, media_type="image/png")

    return Starlette(
        routes=[Route("/", page), Route("/" + SAMPLE_FILE, sample_png)],
    )
