"""The Panel app in a real browser (the Debian chromium, driven by Playwright) against the real
stack: nats-server + llama-server serving SmolLM2-135M-Instruct and Gemma 3 270M aliases.

Screenshots of the chat, models and fleet views go to $OA_SCREENSHOTS (default: the test's
temporary directory)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from autoscaler.client import chat as plain_chat
from domain import state
from events import bus
from events.auth import ensure_credentials, stack_users
from stack.local import LocalStack, StackConfig, free_port

from .conftest import TEST_CLIENTS, TEST_NODES, Collector, spawn_cli, start_nats, wait_until

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"
SMOL, A, B = "smollm2-135m", "gemma3-270m", "gemma3-270m-b"
MIB = 1 << 20
LONG = "Write a very long story about a dragon who learns to bake bread, in many chapters."

if not Path(CHROMIUM).exists():  # .ci/run installs it; say so rather than fail obscurely
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium", allow_module_level=True)


class Ui:
    def __init__(self, stack: LocalStack, port: int) -> None:
        self.stack, self.port = stack, port
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        from ui.serve import serve

        self.server = serve(self.stack.url_for("ui"), "127.0.0.1", self.port)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
async def world(tmp_path_factory) -> AsyncIterator[tuple[LocalStack, Ui, Any]]:
    from playwright.async_api import async_playwright

    cfg = StackConfig(
        state_dir=tmp_path_factory.mktemp("uistack"),
        nodes=1,
        node_memory=700 * MIB,  # SmolLM2 (224 MiB) and one Gemma (400 MiB) fit; two do not
        models=(A, B),
        nats_port=0,
        runtime_port=0,
        function_port=0,
        transport="inprocess",
        tick_s=1.0,
    )
    stack = LocalStack(cfg)
    await stack.start(progress=False)
    ui = Ui(stack, free_port())
    ui.start()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM)
        yield stack, ui, browser
        await browser.close()
    ui.stop()
    await stack.stop()


def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("OA_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


async def open_page(browser: Any, url: str) -> tuple[Any, Any, list[str]]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    outside: list[str] = []
    page.on(
        "request",
        lambda r: (
            outside.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:"))
            else None
        ),
    )
    await page.goto(url)
    await page.wait_for_selector("text=New chat", timeout=60_000)
    await wait_until(lambda: "?u=" in page.url, what="the page to get its owner id")
    return context, page, outside


async def pick_model(page: Any, model: str) -> None:
    select = page.locator("select").first
    await wait_until(
        lambda: _has_option(select, model), timeout=60, what=f"{model} in the model picker"
    )
    label = next(
        o for o in await select.locator("option").all_text_contents() if o.startswith(model)
    )
    await select.select_option(label=label)


async def _has_option(select: Any, model: str) -> bool:
    return any(o.startswith(model) for o in await select.locator("option").all_text_contents())


async def send(page: Any, text: str) -> None:
    await page.fill("textarea[placeholder^=Ask]", text)
    await page.click("button:has-text('Send')")


async def set_max_tokens(page: Any, n: int) -> None:
    field = page.get_by_label("Max tokens")
    await field.fill(str(n))
    await field.press("Enter")


async def last_answer(page: Any) -> str:
    """The text of the last chat message (it is rendered inside a shadow root)."""
    texts = await page.locator(".message").evaluate_all(
        "els => els.map(e => (e.shadowRoot || e).textContent || '')"
    )
    return str(texts[-1]) if texts else ""


async def stats_count(page: Any) -> int:
    return await page.locator(".oa-stats").count()


async def test_chat_streams_text_then_shows_stats_with_nothing_from_outside(world, tmp_path):
    _stack, ui, browser = world
    context, page, outside = await open_page(browser, ui.url)
    await pick_model(page, SMOL)
    await send(page, "Why is the sky blue?")
    lengths: list[int] = []

    async def grew() -> bool:
        lengths.append(len((await last_answer(page)).strip()))
        return len(set(n for n in lengths if n > 0)) >= 2  # seen at two different lengths

    await wait_until(grew, timeout=120, interval=0.05, what="the answer to grow while streaming")
    await wait_until(lambda: stats_count(page), timeout=120, what="the stats under the answer")
    footer = await page.locator(".oa-stats").last.text_content()
    assert "tokens/s" in footer and "first token" in footer and "node-0" in footer
    assert len((await last_answer(page)).strip()) > 20
    assert outside == [], f"the page loaded from outside: {outside}"
    await page.screenshot(path=str(shots(tmp_path) / "ui-chat.png"))
    await context.close()


async def ui_process(nats_url: str, port: int) -> asyncio.subprocess.Process:
    """The app as its own process (`ollama-autoscaler ui`), to be restarted by a test."""
    proc = await spawn_cli(
        "--nats",
        nats_url,
        "ui",
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )

    async def answers() -> bool:
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
        except httpx.HTTPError:
            return False

    await wait_until(answers, timeout=60, what="the UI process to answer")
    return proc


async def test_reload_mid_answer_replays_and_completes_and_history_survives_a_restart(world):
    stack, _ui, browser = world
    port = free_port()
    app = await ui_process(stack.url_for("ui"), port)
    try:
        context, page, _ = await open_page(browser, f"http://127.0.0.1:{port}/")
        await pick_model(page, A)  # the base Gemma: it writes on until max tokens
        await set_max_tokens(page, 300)
        await send(page, "Tell a long story.")
        await wait_until(
            lambda: _answer_longer_than(page, 10), timeout=120, what="the answer to have begun"
        )
        url = page.url
        await page.reload()
        await page.wait_for_selector("text=New chat", timeout=60_000)
        await wait_until(lambda: stats_count(page), timeout=180, what="the answer to complete")
        assert page.url == url and len((await last_answer(page)).strip()) > 20
        # Restart the app: the history is in KV, not in the app.
        app.terminate()
        await app.wait()
        app = await ui_process(stack.url_for("ui"), port)
        await page.reload()
        await page.wait_for_selector("text=New chat", timeout=60_000)
        await wait_until(
            lambda: page.get_by_text("Tell a long story.").count(), timeout=60, what="history"
        )
        await wait_until(lambda: stats_count(page), timeout=60, what="the answer in the history")
        await context.close()
    finally:
        if app.returncode is None:
            app.terminate()
            await app.wait()


async def _answer_longer_than(page: Any, n: int) -> bool:
    """The assistant's answer (after the prompt: a new chat holds just the two) has streamed
    more than `n` characters, and it is not a waiting status."""
    streaming = await page.locator(".message").evaluate_all(
        "els => els.length >= 2 && !(els[els.length - 1].shadowRoot || els[els.length - 1])"
        ".querySelector('.oa-status')"
    )
    return bool(streaming) and len((await last_answer(page)).strip()) > n


async def test_stop_mid_answer_ends_it_within_a_second_and_frees_the_lease(world):
    stack, ui, browser = world
    ends = await Collector().attach(stack.svc.nc, "ollama.chat.completed.*", "ollama.chat.failed.*")
    context, page, _ = await open_page(browser, ui.url)
    await page.click("button:has-text('New chat')")
    await pick_model(page, A)
    await set_max_tokens(page, 400)
    await send(page, "Tell a long story.")
    await wait_until(lambda: _answer_longer_than(page, 10), timeout=120, what="streaming")
    t0 = time.monotonic()
    await page.click("button:has-text('Stop')")
    await wait_until(lambda: page.get_by_text("cancelled").count(), timeout=30, what="cancelled")
    assert time.monotonic() - t0 < 5  # the UI shows it; the system stopped well within that
    failed = [e for e in ends.of_type("chat.failed") if e.data["error"]["code"] == "cancelled"]
    assert len(failed) == 1 and failed[0].data["text"]  # stopped mid-answer, text kept
    task_id = failed[0].data["task_id"]
    assert not [e for e in ends.of_type("chat.completed") if e.data["task_id"] == task_id]

    async def free() -> bool:
        rec, _ = await stack.svc.fleet.get("node-0")
        return all(task_id not in s.leases for s in rec.models.values())

    await wait_until(free, timeout=10, what="the lease released")
    await context.close()


async def test_a_request_that_must_wait_shows_why_then_answers(world):
    stack, ui, browser = world
    fleet = stack.svc.fleet
    await plain_chat(stack.svc.nc, A, "hi", timeout=120, max_tokens=2)  # A resident
    await fleet.update("node-0", lambda r: state.take_lease(r, A, "held-by-test", time.time()))
    context, page, _ = await open_page(browser, ui.url)
    await page.click("button:has-text('New chat')")
    await pick_model(page, B)  # needs A's memory, and A is in use
    await send(page, "Hello")
    await wait_until(
        lambda: page.get_by_text("queued — waiting for memory").count(),
        timeout=60,
        what="the queued state shown",
    )
    await fleet.update(
        "node-0", lambda r: state.release_lease(r, A, "held-by-test", time.time(), 300)
    )
    await stack.svc.waiting.wake_heads("test-release")
    await wait_until(lambda: stats_count(page), timeout=180, what="the answer after waiting")
    footer = await page.locator(".oa-stats").last.text_content()
    assert "queue 0 ms" not in footer
    await context.close()


async def test_models_view_loads_and_evicts_and_the_fleet_view_follows(world, tmp_path):
    _, ui, browser = world
    context, page, _ = await open_page(browser, ui.url)
    await page.click("text=Models")
    await wait_until(lambda: page.locator("#oa-models").count(), timeout=30, what="the table")
    select = page.locator("select").nth(1)
    await select.select_option(label=SMOL)
    await page.click("button:has-text('Load')")
    try:
        await wait_until(
            lambda: page.get_by_text(f"{SMOL} is ready").count(), timeout=120, what="loaded"
        )
    except AssertionError:
        await page.screenshot(path=str(shots(tmp_path) / "ui-models-failed.png"))
        raise
    await page.screenshot(path=str(shots(tmp_path) / "ui-models.png"))
    await page.click("text=Fleet")
    card = page.locator("#node-node-0")
    await wait_until(lambda: _contains(card, SMOL), timeout=30, what="the fleet card")
    await page.screenshot(path=str(shots(tmp_path) / "ui-fleet.png"))
    await page.click("text=Models")
    await page.click("button:has-text('Evict')")
    await wait_until(
        lambda: page.get_by_text(f"{SMOL} evicted").count(), timeout=60, what="evicted"
    )
    await page.click("text=Fleet")
    await wait_until(lambda: _lacks(card, SMOL), timeout=30, what="the card without it")
    assert SMOL not in (await card.text_content() or "")
    await wait_until(
        lambda: page.locator("#oa-log").get_by_text(f"{SMOL} evicted").count(),
        timeout=30,
        what="the eviction in the event log",
    )
    await context.close()


async def _contains(loc: Any, text: str) -> bool:
    return text in (await loc.text_content() or "")


async def _lacks(loc: Any, text: str) -> bool:
    return text not in (await loc.text_content() or "")


async def test_two_browsers_chat_at_once_without_mixing(world):
    _stack, ui, browser = world
    (c1, p1, _), (c2, p2, _) = await asyncio.gather(
        open_page(browser, ui.url), open_page(browser, ui.url)
    )
    assert p1.url != p2.url  # two owners
    for page in (p1, p2):
        await pick_model(page, SMOL)
    await asyncio.gather(send(p1, "Name a red fruit."), send(p2, "Name a blue bird."))
    for page in (p1, p2):
        await wait_until(lambda p=page: stats_count(p), timeout=180, what="both answers")
    assert await p1.get_by_text("Name a blue bird.").count() == 0
    assert await p2.get_by_text("Name a red fruit.").count() == 0
    await c1.close()
    await c2.close()


async def test_nats_unreachable_shows_a_banner_and_recovers_by_itself(world, tmp_path):
    _stack, _ui, browser = world
    from ui.serve import serve

    port = free_port()
    nats_port = free_port()
    # The server that will come up has auth: the UI is given its identity (start_nats keeps
    # the passwords already in its auth folder).
    creds = ensure_credentials(tmp_path / "js-auth", stack_users(TEST_NODES, TEST_CLIENTS))
    ui_url = bus.with_identity(f"nats://127.0.0.1:{nats_port}", "ui", creds.passwords["ui"])
    server = serve(ui_url, "127.0.0.1", port)
    server.start()
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"http://127.0.0.1:{port}/")
    banner = page.get_by_text("NATS is unreachable")
    await wait_until(lambda: banner.count(), timeout=60, what="the banner")
    url, proc = start_nats(tmp_path / "js", nats_port)
    nc = await bus.connect(url)
    await bus.provision(nc.jetstream())  # as the stack does when it starts
    await nc.close()
    try:
        await wait_until(lambda: _zero(banner), timeout=60, what="the banner to go")
        assert await banner.count() == 0
        assert await page.locator("text=New chat").count() >= 1  # and the app is usable
    finally:
        proc.terminate()
        proc.wait(10)
        await context.close()
        server.stop()


async def _zero(loc: Any) -> bool:
    return await loc.count() == 0


async def test_a_non_loopback_address_needs_auth_and_a_wrong_password_is_refused(world):
    stack, _ui, _browser = world
    proc = await spawn_cli(
        "--nats",
        stack.url_for("ui"),
        "ui",
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
        env={k: v for k, v in os.environ.items() if not k.startswith("OA_UI_PASSWORD")},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "without auth" in lines[0], lines

    from ui.serve import serve

    port = free_port()
    os.environ["OA_UI_PASSWORD"] = "right-horse-battery"
    try:
        server = serve(stack.url_for("ui"), "127.0.0.1", port)
    finally:
        del os.environ["OA_UI_PASSWORD"]
    server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            anonymous = await client.get("/")
            wrong = await client.post("/login", data={"username": "me", "password": "nope"})
            right = await client.post(
                "/login", data={"username": "me", "password": "right-horse-battery"}
            )
        assert anonymous.status_code == 302 and "login" in anonymous.headers["location"]
        assert "error" in wrong.headers.get("location", "") or wrong.status_code >= 400
        assert "user" not in wrong.cookies
        assert right.status_code == 302 and "error" not in right.headers.get("location", "")
        assert "user" in right.cookies
    finally:
        server.stop()


async def test_the_websocket_is_refused_to_origins_not_named(world, monkeypatch):
    """Bokeh's origin check: loopback and the OA_UI_ORIGINS the operator names may open the
    page's websocket; any other origin (another site in the user's browser) gets 403."""
    from ui.serve import serve, ws_origins

    stack, _ui, _browser = world
    monkeypatch.setenv("OA_UI_ORIGINS", "chat.example.test, admin.example.test:8443")
    port = free_port()
    assert ws_origins("127.0.0.1", port)[-2:] == ["chat.example.test", "admin.example.test:8443"]
    server = serve(stack.url_for("ui"), "127.0.0.1", port)
    server.start()
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            statuses = {}
            for origin in (
                "http://chat.example.test",
                "https://admin.example.test:8443",
                f"http://localhost:{port}",
                "http://evil.example",
                "https://admin.example.test:9999",
            ):
                resp = await client.get("/ws", headers={**upgrade, "Origin": origin})
                statuses[origin] = resp.status_code
        refused = {o for o, code in statuses.items() if code == 403}
        assert refused == {"http://evil.example", "https://admin.example.test:9999"}, statuses
    finally:
        server.stop()


def test_check_access_rules():
    from ui.serve import RefusedToServe, check_access

    check_access("127.0.0.1", None)
    check_access("::1", None)
    check_access("0.0.0.0", "secret")
    with pytest.raises(RefusedToServe, match="without auth"):
        check_access("0.0.0.0", None)
    with pytest.raises(RefusedToServe):
        check_access("192.168.1.5", "")


async def test_up_with_the_ui_stops_everything_on_ctrl_c(tmp_path):
    """The UI server must not take Ctrl-C from `up` (its own handler stopped the event loop
    and left every child running)."""
    import psutil

    ui_port = free_port()
    proc = await spawn_cli(
        "up",
        "--nodes",
        "0",
        "--state-dir",
        str(tmp_path),
        "--nats-port",
        str(free_port()),
        "--function-port",
        "0",
        "--ui-port",
        str(ui_port),
        "--gateway-listen",
        f"127.0.0.1:{free_port()}",
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen = b""
    while b"open the UI" not in seen:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line, seen.decode()
        seen += line
    assert b"gateway " in seen and b"warning" not in seen, seen.decode()  # it started too
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children
    proc.send_signal(2)
    rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and b"stopped." in rest, rest.decode()[-2000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive


async def test_pull_shows_progress_then_the_model_loads_and_evicts_and_a_bad_pull_leaves_nothing(
    world, tmp_path
):
    import hashlib
    import http.server
    import shutil
    import threading

    from stack.assets import ensure_smollm2

    stack, ui, browser = world
    www = tmp_path / "www"
    www.mkdir()
    gguf = ensure_smollm2()
    shutil.copy(gguf, www / "smol.gguf")
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    models_dir = stack.models_dir("node-0")
    context, page, _ = await open_page(browser, ui.url)
    try:
        await page.click("text=Models")
        # A bad checksum: an error, and no file left behind.
        await page.get_by_label("New model name").fill("smol-bad")
        await page.get_by_label("GGUF URL (llama.cpp nodes; empty: Ollama library)").fill(
            f"{base}/smol.gguf"
        )
        await page.get_by_label("sha256 (optional)").fill("0" * 64)
        await page.click("button:has-text('Pull')")
        await wait_until(
            lambda: page.get_by_text("checksum_mismatch").count(), timeout=120, what="the error"
        )
        assert not list(models_dir.glob("*smol-bad*"))
        # A good pull: the bar moves, then the model is in the catalog.
        await page.get_by_label("New model name").fill("smol-ui")
        await page.get_by_label("sha256 (optional)").fill(sha)
        await page.click("button:has-text('Pull')")
        await wait_until(
            lambda: page.get_by_text("smol-ui pulled onto node-0").count(),
            timeout=120,
            what="pulled",
        )
        assert await page.locator("progress").count() >= 1
        await page.screenshot(path=str(shots(tmp_path) / "ui-pull.png"))
        await wait_until(
            lambda: _contains(page.locator("#oa-models"), "smol-ui"),
            timeout=30,
            what="the pulled model in the table",
        )
        await page.locator("select").nth(1).select_option(label="smol-ui")
        await page.click("button:has-text('Load')")
        await wait_until(
            lambda: page.get_by_text("smol-ui is ready").count(), timeout=120, what="loaded"
        )
        await page.click("button:has-text('Evict')")
        await wait_until(
            lambda: page.get_by_text("smol-ui evicted").count(), timeout=60, what="evicted"
        )
    finally:
        server.shutdown()
        await context.close()
