"""Serve the Panel app: `ollama-autoscaler ui [--nats URL] [--host H] [--port N]`.

Every script, stylesheet and font comes from the app itself (Bokeh/Panel resources served by
the server), so the page works air-gapped. On a loopback address the app may run open; on any
other address it refuses to start without auth: a password for Panel's basic auth from
`OA_UI_PASSWORD` or the file named by `OA_UI_PASSWORD_FILE`.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
from pathlib import Path
from typing import Any

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class RefusedToServe(RuntimeError):
    """Asked to listen beyond this machine without auth."""


def ui_password() -> str | None:
    if os.environ.get("OA_UI_PASSWORD"):
        return os.environ["OA_UI_PASSWORD"]
    path = os.environ.get("OA_UI_PASSWORD_FILE")
    if path:
        return Path(path).read_text().strip() or None
    return None


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_access(host: str, password: str | None) -> None:
    if not is_loopback(host) and not password:
        raise RefusedToServe(
            f"refusing to serve the UI on {host} without auth: set OA_UI_PASSWORD (or "
            "OA_UI_PASSWORD_FILE) for basic auth, or listen on 127.0.0.1"
        )


def ws_origins(host: str, port: int) -> list[str]:
    """The origins whose pages may open the app's websocket (Bokeh refuses others): this
    address and loopback (a port-forward), plus the `OA_UI_ORIGINS` the operator names
    (comma-separated `host[:port]`, e.g. the load balancer's or Ingress's host name)."""
    extra = [o.strip() for o in os.environ.get("OA_UI_ORIGINS", "").split(",") if o.strip()]
    return list(dict.fromkeys([f"{host}:{port}", f"localhost:{port}", f"127.0.0.1:{port}", *extra]))


def serve(nats_url: str, host: str = "127.0.0.1", port: int = 8501, show: bool = False) -> Any:
    """Start the server (non-blocking, on the running asyncio loop); returns it."""
    password = ui_password()
    check_access(host, password)
    os.environ.setdefault("BOKEH_RESOURCES", "server")  # nothing from a CDN
    import panel as pn

    from .app import make_app
    from .bus import UiBus

    pn.extension(design="native", notifications=False)
    ui = UiBus(nats_url)
    extra: dict[str, Any] = {}
    if password:
        extra = {"basic_auth": password, "cookie_secret": secrets.token_hex(16)}
    # pn.serve installs a SIGINT handler that stops the event loop under the caller's feet
    # (the stack would not stop its children): keep the caller's handler.
    previous = signal.getsignal(signal.SIGINT)
    server = pn.serve(
        {"/": make_app(ui)},
        address=host,
        port=port,
        show=show,
        start=False,
        title="Ollama Autoscaler",
        verbose=False,
        websocket_origin=ws_origins(host, port),
        **extra,
    )
    signal.signal(signal.SIGINT, previous)
    return server
