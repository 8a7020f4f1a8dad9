"""The pack in the browser: the example workflow in real ComfyUI and Debian's Chromium.

One ComfyUI (the session's `comfy_server`, --cpu) with a tiny speaking checkpoint and two
voice clips, one Chromium page for the whole module (tests run in file order and build on
each other: load, switch modes, change presets, break the route, queue). Every request
that is not to localhost is aborted. Screenshots go to test-artifacts/.

What is checked:
- the example workflow loads with every node type known, no missing-nodes dialog and no
  console error;
- mode auto/preset/manual shows exactly that mode's widget, and the node's size follows;
- the plan drawing (web/vibevoice_offload.js) asks POST /vibevoice_offload/plan with the
  new preset and draws the new split: the bar's resident (green) and streamed (blue)
  pixels on the screenshot follow the plan;
- the route failing (HTTP 500, a dropped connection) or not answering in time shows
  "plan unavailable", throws nothing, and a later answer brings the plan back;
- Run from the UI (app.queuePrompt) writes audio to the output folder and Generate
  Dialog shows the run's statistics.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import uuid

import numpy as np
import pytest

from comfy_server import ARTIFACTS_DIR, REPO_ROOT, block_external_requests

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

UI_WORKFLOW = REPO_ROOT / "example_workflows" / "vibevoice_dialog.json"
MODEL = "VibeVoice-tiny-test"  # 4 decoder layers, hop 4 samples; no tokenizer: ComfyUI's Qwen2.5 one
VOICES = ("vibevoice_speaker_1.wav", "vibevoice_speaker_2.wav")  # the names in the example workflow
CONFIG_ID, LOADER_ID, GENERATE_ID, SAVE_ID = 3, 4, 5, 6  # node ids in the example workflow
PLAN_ROUTE = "**/vibevoice_offload/plan"
RESIDENT_RGB = (0x3F, 0x9D, 0x63)  # colors.resident / colors.streamed in web/vibevoice_offload.js
STREAMED_RGB = (0x4A, 0x74, 0xB8)


def shot(page, name: str) -> None:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS_DIR / f"browser-workflow-{name}.png"))


def is_external(url: str) -> bool:
    return (urllib.parse.urlsplit(url or "").hostname or "") not in ("127.0.0.1", "localhost", "::1", "")


class Console:
    """Console errors and uncaught exceptions of the page, with a cursor per test."""

    def __init__(self, page):
        self.entries: list[tuple[str, str, str]] = []
        page.on("console", lambda m: m.type == "error" and self.entries.append(("console", m.text, m.location.get("url", ""))))
        page.on("pageerror", lambda e: self.entries.append(("pageerror", f"{e}\n{getattr(e, 'stack', '')}", "")))

    def mark(self) -> int:
        return len(self.entries)

    def errors(self, since: int = 0, *, allow=lambda text, url: False) -> list:
        """Errors since `since`, less the blocked non-localhost requests (our own doing)
        and whatever `allow(text, url)` accepts."""
        out = []
        for kind, text, url in self.entries[since:]:
            if kind == "console" and text.startswith("Failed to load resource") and is_external(url):
                continue
            if allow(text, url):
                continue
            out.append((kind, text, url))
        return out


# ---- set-up -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(comfy_server):
    """The shared server with the tiny checkpoint and the example workflow's two voices."""
    import soundfile as sf

    from vibevoice_offload.synthetic import write_demo_checkpoint

    model_dir = comfy_server.models_dir / MODEL
    if not model_dir.exists():  # test_comfy_nodes.py may have written the same one
        write_demo_checkpoint(model_dir)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / name).unlink()
    rng = np.random.default_rng(3)
    clips = ((rng.standard_normal(96) * 0.2, 24000), (rng.standard_normal((64, 2)) * 0.2, 16000))
    for name, (samples, rate) in zip(VOICES, clips):
        if not (comfy_server.input_dir / name).exists():
            sf.write(comfy_server.input_dir / name, samples.astype(np.float32), rate, subtype="PCM_16")
    # No Templates dialog on first load (the frontend's "new user" path).
    comfy_server.post("/settings/Comfy.TutorialCompleted", True)
    return comfy_server


@pytest.fixture(scope="module")
def ui(server, chromium_launch_options):
    """One Chromium page on ComfyUI's frontend, booted, with a console recorder."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(**chromium_launch_options)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 900})
            block_external_requests(context)
            context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            page = context.new_page()
            page.set_default_timeout(30_000)
            console = Console(page)
            page.goto(server.base_url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=60_000)
            # Our extension registered with the frontend (it lists extensions by name).
            page.wait_for_function("() => app.extensions.some(e => e.name === 'VibeVoice.Offload')", timeout=30_000)
            close_dialogs(page)
            yield page, console
        finally:
            browser.close()


def close_dialogs(page) -> None:
    for _ in range(3):
        if not page.locator(".p-dialog:visible").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def set_widget(page, node_id: int, name: str, value) -> None:
    """As the UI does: set the value and run the widget's callback."""
    page.evaluate(
        """([id, name, value]) => {
            const node = app.graph.getNodeById(id);
            const w = node.widgets.find(w => w.name === name);
            if (!w) throw new Error(`node ${id} has no widget ${name}`);
            w.value = value;
            w.callback?.(value, app.canvas, node);
            node.setDirtyCanvas(true, true);
        }""",
        [node_id, name, value],
    )


def ensure_workflow(page) -> None:
    """The example workflow in the page (loaded by the first test; again if a test runs alone)."""
    if page.evaluate(f"() => !!app.graph.getNodeById({CONFIG_ID})?.vibevoicePlan"):
        return
    page.evaluate("wf => app.loadGraphData(wf)", json.loads(UI_WORKFLOW.read_text()))
    wait_plan(page, "ok", 0)


def use_tiny_model(page, mode: str) -> None:
    """Loader on the installed tiny model (4 decoder layers), Offload Config in `mode`, plan drawn."""
    ensure_workflow(page)
    current = page.evaluate(
        f"() => [app.graph.getNodeById({LOADER_ID}).widgets[0].value, app.graph.getNodeById({CONFIG_ID}).widgets[0].value]"
    )
    if current == [MODEL, mode]:
        return
    before = plan_state(page)["updates"]
    set_widget(page, LOADER_ID, "model", MODEL)
    set_widget(page, LOADER_ID, "dtype", "fp32")
    set_widget(page, CONFIG_ID, "mode", mode)
    wait_plan(page, "ok", before, model=MODEL, mode=mode)


def painted(page) -> None:
    """After the canvas has drawn twice (litegraph lays widgets out while drawing)."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def plan_state(page) -> dict:
    return page.evaluate(
        f"""() => {{
            const s = app.graph.getNodeById({CONFIG_ID}).vibevoicePlan;
            return {{status: s.status, plan: s.plan, error: s.error, request: s.request, updates: s.updates,
                     requests: s.requests, drawn: s.drawn ?? null}};
        }}"""
    )


def wait_plan(page, status: str, updates_after: int, **plan_fields) -> dict:
    """Until the Offload Config's plan has answered again (`updates` > updates_after) with
    `status` and the given plan fields, and has been drawn."""
    cond = " && ".join(f"s.plan?.{k} === {json.dumps(v)}" for k, v in plan_fields.items()) or "true"
    page.wait_for_function(
        f"""() => {{
            const s = app.graph.getNodeById({CONFIG_ID}).vibevoicePlan;
            return s.updates > {updates_after} && s.status === {json.dumps(status)} && ({cond})
                && s.drawn && s.drawn.status === s.status;
        }}""",
        timeout=30_000,
    )
    painted(page)
    return plan_state(page)


def visible_widgets(page, node_id: int) -> list[str]:
    return page.evaluate(
        f"""() => {{
            const node = app.graph.getNodeById({node_id});
            return node.widgets.filter(w => node.isWidgetVisible(w)).map(w => w.name);
        }}"""
    )


def bar_pixels(page) -> tuple[int, int]:
    """(resident, streamed) coloured pixels inside the drawn layer bar, read off a screenshot."""
    from io import BytesIO

    from PIL import Image

    box = page.evaluate(
        f"""() => {{
            const node = app.graph.getNodeById({CONFIG_ID});
            const [x, y, w, h] = node.vibevoicePlan.drawn.bar;
            const canvas = app.canvas.canvas;
            const rect = canvas.getBoundingClientRect();
            const k = rect.width / canvas.width;  // device pixels -> CSS pixels
            const a = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + x, node.pos[1] + y]);
            const b = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + x + w, node.pos[1] + y + h]);
            return {{x: rect.left + a[0] * k, y: rect.top + a[1] * k, width: (b[0] - a[0]) * k, height: (b[1] - a[1]) * k}};
        }}"""
    )
    assert box["width"] > 50 and box["height"] > 5, box
    image = Image.open(BytesIO(page.screenshot(clip=box))).convert("RGB")
    pixels = np.asarray(image).reshape(-1, 3).astype(int)

    def count(rgb):
        return int((np.abs(pixels - np.array(rgb)).max(axis=1) <= 24).sum())

    return count(RESIDENT_RGB), count(STREAMED_RGB)


# ---- tests --------------------------------------------------------------------------------------

def test_plan_route_answers_json_for_good_and_bad_requests(server):
    mark = server.log_mark()
    """POST /vibevoice_offload/plan runs only the planner and never fails without JSON."""
    import torch

    from comfy_server import ComfyError
    from vibevoice_offload import planner

    config, workload = planner.load_size_config("Large"), planner.Workload.for_minutes(planner.DEFAULT_MINUTES)

    def estimated(stream_dtype: str) -> int:  # the library's price of the preset the route plans
        plan = planner.plan_preset(config, "balanced", stream_dtype=stream_dtype, workload=workload)
        return int(planner.estimate_for_workload(config, plan, torch.bfloat16, workload).total_vram)

    large = server.post("/vibevoice_offload/plan", {"size": "Large", "mode": "preset", "preset": "balanced"})
    assert (large["num_layers"], large["resident_layers"], large["streamed_layers"]) == (28, 9, 19)
    assert large["card_vram_bytes"] is None and large["budget_bytes"] is None  # --cpu
    assert large["estimated_vram_bytes"] == estimated("bf16") and large["error"] is None
    assert large["predicted_ms_per_frame"] > 0 and large["rtf"] == pytest.approx(large["predicted_ms_per_frame"] / (1000 * 3200 / 24000))
    # bf16-packed: the same 9 layers packed on the device too, as the node's engine keeps them,
    # need less than bf16 despite the larger ring (decoded they would need 0.7 GB more)
    packed = server.post("/vibevoice_offload/plan", {"size": "Large", "mode": "preset", "preset": "balanced", "stream_dtype": "bf16-packed"})
    assert packed["resident_layers"] == 9 and packed["estimated_vram_bytes"] == estimated("bf16-packed") < large["estimated_vram_bytes"]

    # every layer resident (auto on the CPU): bf16-packed keeps them decoded, as the node
    # does, so it needs and costs exactly what bf16 does
    auto = {dtype: server.post("/vibevoice_offload/plan", {"model": MODEL, "mode": "auto", "stream_dtype": dtype}) for dtype in ("bf16", "bf16-packed")}
    assert auto["bf16-packed"]["resident_layers"] == 4
    for key in ("estimated_vram_bytes", "predicted_ms_per_frame"):
        assert auto["bf16-packed"][key] == auto["bf16"][key], key
    tiny = server.post("/vibevoice_offload/plan", {"model": MODEL, "mode": "manual", "resident_layers": 99})
    assert (tiny["num_layers"], tiny["resident_layers"]) == (4, 4) and "all 4" in tiny["note"]
    light = server.post("/vibevoice_offload/plan", {"model": MODEL, "mode": "preset", "preset": "light"})
    assert (light["resident_layers"], light["streamed_layers"]) == (3, 1)

    fallback = server.post("/vibevoice_offload/plan", {"model": "VibeVoice-1.5B", "size": "1.5B"})
    assert fallback["model_label"] == "VibeVoice-1.5B" and "not found" in fallback["note"]
    missing = server.post("/vibevoice_offload/plan", {"model": "no-such-model"})
    assert "not found" in missing["error"] and "num_layers" not in missing

    for body in ({"mode": "fast"}, {"preset": "huge"}, {"resident_layers": "ten"}, {"prefetch_depth": 1}, [1, 2]):
        with pytest.raises(ComfyError) as bad:
            server.post("/vibevoice_offload/plan", body)
        assert bad.value.status == 400 and bad.value.body["error"], body
    assert "server error" not in server.log_text(since=mark).lower()


def test_example_workflow_loads_without_missing_nodes_or_console_errors(ui):
    page, console = ui
    boot_errors = console.errors()
    assert not [e for e in boot_errors if "vibevoice" in (e[1] + e[2]).lower()], boot_errors

    mark = console.mark()
    workflow = json.loads(UI_WORKFLOW.read_text())
    page.evaluate("wf => app.loadGraphData(wf)", workflow)
    state = wait_plan(page, "ok", 0)
    page.wait_for_timeout(500)  # a late warning dialog would be open by now

    types = page.evaluate("() => app.graph._nodes.map(n => [n.id, n.type, !!LiteGraph.registered_node_types[n.type], !!n.has_errors])")
    assert sorted(t[1] for t in types) == sorted(n["type"] for n in workflow["nodes"])
    assert all(known and not errors for _, _, known, errors in types), types
    assert page.get_by_text(re.compile("missing nodes|unsupported nodes", re.I)).count() == 0
    assert page.locator(".p-dialog:visible").count() == 0
    shot(page, "1-loaded")
    assert console.errors(mark) == []

    # The plan came from the route for this graph: the loader's model and dtype, Generate
    # Dialog's 300 s, mode auto. VibeVoice-1.5B is not installed: planned from its config.
    assert state["request"]["model"] == "VibeVoice-1.5B" and state["request"]["size"] == "1.5B"
    assert state["request"]["minutes"] == 5 and state["request"]["mode"] == "auto"
    plan = state["plan"]
    assert plan["num_layers"] == 28 and plan["resident_layers"] + plan["streamed_layers"] == 28
    assert plan["card_vram_bytes"] is None and plan["error"] is None  # --cpu: no card, nothing refused
    assert plan["estimated_vram_bytes"] > 1e9 and plan["predicted_ms_per_frame"] > 0


def test_mode_switch_shows_only_that_modes_widgets(ui):
    page, console = ui
    ensure_workflow(page)
    set_widget(page, CONFIG_ID, "mode", "auto")
    mark = console.mark()
    common = ["mode", "stream_dtype", "prefetch_depth", "pinned"]
    assert visible_widgets(page, CONFIG_ID) == ["mode", "stream_dtype", "prefetch_depth", "pinned", "target_utilisation", "vibevoice_plan"]
    heights = {}
    for mode, own in (("manual", "resident_layers"), ("preset", "preset"), ("auto", "target_utilisation"), ("preset", "preset")):
        set_widget(page, CONFIG_ID, "mode", mode)
        painted(page)
        shown = visible_widgets(page, CONFIG_ID)
        assert set(shown) == {*common, own, "vibevoice_plan"}, (mode, shown)
        # hidden widgets take no room: every shown one sits below the previous one
        ys = page.evaluate(
            f"() => {{ const n = app.graph.getNodeById({CONFIG_ID}); return n.widgets.filter(w => n.isWidgetVisible(w)).map(w => w.y); }}"
        )
        assert ys == sorted(ys) and all(b - a <= 30 for a, b in zip(ys[:-2], ys[1:-1])), (mode, ys)
        heights[mode] = page.evaluate(f"() => app.graph.getNodeById({CONFIG_ID}).size[1]")
        if mode == "manual":
            shot(page, "2-mode-manual")
    assert len(set(heights.values())) == 1, heights  # one mode widget each: the same height
    # the hidden values are still saved with the workflow and sent with the prompt
    saved = page.evaluate(f"() => app.graph.getNodeById({CONFIG_ID}).serialize().widgets_values")
    assert saved == ["preset", "balanced", 14, "bf16", 2, True, 0.9]
    assert console.errors(mark) == []


def test_plan_drawing_follows_the_preset(ui):
    page, console = ui
    ensure_workflow(page)
    set_widget(page, CONFIG_ID, "preset", "balanced")
    mark = console.mark()
    use_tiny_model(page, "preset")
    state = wait_plan(page, "ok", -1, model=MODEL, mode="preset", resident_layers=1)  # balanced: floor(0.35 x 4)
    assert state["request"]["preset"] == "balanced"
    balanced = bar_pixels(page)
    shot(page, "3-preset-balanced")

    requests = []
    page.on("request", lambda r: "/vibevoice_offload/plan" in r.url and requests.append(json.loads(r.post_data)))
    for preset, resident in (("light", 3), ("extreme", 0)):
        before = plan_state(page)["updates"]
        set_widget(page, CONFIG_ID, "preset", preset)
        state = wait_plan(page, "ok", before, resident_layers=resident)
        assert requests[-1]["preset"] == preset and requests[-1]["model"] == MODEL
        assert state["drawn"]["resident"] == resident and state["drawn"]["streamed"] == 4 - resident
        if preset == "light":
            light = bar_pixels(page)
            shot(page, "4-preset-light")
        else:
            extreme = bar_pixels(page)
    # 1 of 4 cells green, then 3 of 4, then none: the drawing on screen follows the plan
    assert balanced[0] > 0 and balanced[1] > 0
    assert light[0] > 2 * balanced[0] and light[1] < balanced[1]
    assert extreme[0] == 0 and extreme[1] > light[1]

    # Typing quickly: the debounce sends one request for the last value, not one per change.
    n = len(requests)
    before = plan_state(page)["updates"]
    for preset in ("moderate", "aggressive", "light"):
        set_widget(page, CONFIG_ID, "preset", preset)
    wait_plan(page, "ok", before, resident_layers=3)
    page.wait_for_timeout(400)
    assert [r["preset"] for r in requests[n:]] == ["light"]
    assert console.errors(mark) == []


def test_plan_unavailable_when_the_route_fails_or_hangs(ui):
    page, console = ui
    use_tiny_model(page, "preset")
    mark = console.mark()
    held = []
    behaviour = {"mode": None}

    def failing(route):
        if behaviour["mode"] == "500":
            route.fulfill(status=500, content_type="text/plain", body="Internal Server Error")
        elif behaviour["mode"] == "drop":
            route.abort("connectionreset")
        else:  # "hang": never answered (released at the end)
            held.append(route)

    page.route(PLAN_ROUTE, failing)
    try:
        page.evaluate("() => { window.VIBEVOICE_PLAN_TIMEOUT_MS = 1500; window.VIBEVOICE_PLAN_RETRY_MS = 1500; }")
        for mode, preset, why in (("500", "moderate", "HTTP 500"), ("drop", "balanced", ""), ("hang", "aggressive", "no answer in time")):
            behaviour["mode"] = mode
            before = plan_state(page)["updates"]
            set_widget(page, CONFIG_ID, "preset", preset)
            state = wait_plan(page, "unavailable", before)
            assert state["plan"] is None and state["drawn"]["bar"] is None
            assert why in state["error"], state["error"]
            if mode == "hang":
                shot(page, "5-plan-unavailable")

        # The server comes back: the plan returns by itself (a retry), with no change by the user.
        behaviour["mode"] = "500"
        before = plan_state(page)["updates"]
        set_widget(page, CONFIG_ID, "preset", "moderate")
        wait_plan(page, "unavailable", before)
        page.unroute(PLAN_ROUTE)
        before = plan_state(page)["updates"]
        state = wait_plan(page, "ok", before, resident_layers=2)  # moderate: floor(0.5 x 4)
        assert state["request"]["preset"] == "moderate"
    finally:
        page.unroute(PLAN_ROUTE)
        for route in held:
            try:
                route.abort()
            except Exception:  # the page gave up on it already
                pass
        page.evaluate("() => { delete window.VIBEVOICE_PLAN_TIMEOUT_MS; delete window.VIBEVOICE_PLAN_RETRY_MS; }")

    # nothing thrown; the only console errors are the browser's notes on the failed requests
    assert console.errors(mark, allow=lambda text, url: "/vibevoice_offload/plan" in url and text.startswith("Failed to load resource")) == []
    assert not [e for e in console.entries[mark:] if e[0] == "pageerror"]


def test_run_from_the_ui_writes_audio_and_shows_the_stats(ui, server):
    page, console = ui
    use_tiny_model(page, "auto")  # --cpu: ComfyUI grants everything, nothing streams
    wait_plan(page, "ok", -1, mode="auto", resident_layers=4)
    mark = console.mark()
    set_widget(page, GENERATE_ID, "script", "Speaker 1: Hello there.\nSpeaker 2: Fine, thanks.")
    set_widget(page, GENERATE_ID, "steps", 2)
    set_widget(page, GENERATE_ID, "max_seconds", 0.01)  # the widget's smallest step: 60 frames of 4 samples
    prefix = f"vibevoice-browser/{uuid.uuid4().hex[:8]}"
    set_widget(page, SAVE_ID, "filename_prefix", prefix)
    assert page.evaluate(f"() => app.graph.getNodeById({GENERATE_ID}).vibevoiceStats") is None
    assert "vibevoice_stats" not in visible_widgets(page, GENERATE_ID)
    height_before = page.evaluate(f"() => app.graph.getNodeById({GENERATE_ID}).size[1]")

    started = time.monotonic()
    page.evaluate("() => app.queuePrompt(0, 1)")  # its return value is unreliable: check /history
    folder, stem = prefix.split("/")
    entry = None
    while time.monotonic() - started < 120:
        for item in server.history().values():
            saved = item.get("outputs", {}).get(str(SAVE_ID), {}).get("audio", [])
            if any(a["subfolder"] == folder and a["filename"].startswith(stem) for a in saved):
                entry = item
        if entry is not None:
            break
        time.sleep(0.25)
    assert entry is not None, f"no audio saved with prefix {prefix} within 120 s:\n{server.log_tail()}"
    assert entry["status"]["status_str"] == "success", entry["status"]

    import soundfile as sf

    (saved,) = entry["outputs"][str(SAVE_ID)]["audio"]
    audio, rate = sf.read(server.output_dir / saved["subfolder"] / saved["filename"])
    assert rate == 24000 and len(audio) == 60 * 4 and np.abs(audio).max() > 0

    page.wait_for_function(f"() => app.graph.getNodeById({GENERATE_ID}).vibevoiceStatsDrawn", timeout=30_000)
    painted(page)
    stats, lines = page.evaluate(f"() => {{ const n = app.graph.getNodeById({GENERATE_ID}); return [n.vibevoiceStats, n.vibevoiceStatsDrawn]; }}")
    (sent,) = entry["outputs"][str(GENERATE_ID)]["vibevoice_stats"]
    assert stats == sent  # exactly the run's ui payload
    assert stats["frames"] == 60 and stats["model"] == MODEL
    assert lines[0].startswith("Last run: 60 frames")
    assert f"{stats['ms_per_frame']:.1f} ms per frame" in lines[1] and f"RTF {stats['rtf']:.2f}" in lines[1]
    assert "streamed " in lines[2] and "peak VRAM" in lines[2]
    assert lines[3].startswith(f"layers {stats['resident_layers']}/{stats['num_layers']} resident")
    assert "vibevoice_stats" in visible_widgets(page, GENERATE_ID)
    assert page.evaluate(f"() => app.graph.getNodeById({GENERATE_ID}).size[1]") > height_before
    shot(page, "6-after-run")
    assert console.errors(mark) == []
