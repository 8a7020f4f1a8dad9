"""ComfyUI's frontend opens in Debian's Chromium with the pack installed."""

import pytest

from comfy_server import ARTIFACTS_DIR, block_external_requests

pytestmark = [pytest.mark.comfy, pytest.mark.browser]


def test_frontend_loads_in_chromium(comfy_server, chromium_launch_options):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(**chromium_launch_options)
        try:
            context = browser.new_context()
            block_external_requests(context)  # the frontend calls api.comfy.org on load
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(comfy_server.base_url, wait_until="domcontentloaded", timeout=60_000)
            # window.app exists once the graph editor is up
            page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
            node_types = page.evaluate("() => Object.keys(LiteGraph.registered_node_types).length")
            page.screenshot(path=str(ARTIFACTS_DIR / "browser-boot.png"))  # kept for CI
        finally:
            browser.close()
    assert node_types > 100  # the core nodes from /object_info were registered
    assert not [e for e in errors if "VibeVoice" in e], errors
