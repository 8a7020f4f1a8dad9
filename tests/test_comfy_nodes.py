"""The nodes in a real ComfyUI 0.3.75: schema, a workflow end to end, cancel, /free, and
model management (eviction by another model, reclaim on the next run).

Two halves:
- through a running server (the `comfy_server` fixture, --cpu): /object_info, /prompt,
  /history, /interrupt, /free, exactly as the frontend drives them;
- in this process: ComfyUI's own `comfy.model_management` imported with --cpu (as its unit
  tests do) and the pack imported as a package (as ComfyUI imports custom nodes), to watch
  the patcher's counters. A GPU is simulated on the CPU by giving ComfyUI a fake amount of
  free VRAM for a device it does not treat as the CPU; everything else is ComfyUI's code.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import time
import uuid
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from comfy_server import PACK_FOLDER_NAME, REPO_ROOT

pytestmark = pytest.mark.comfy

NODE_IDS = ("VibeVoiceOffloadLoader", "VibeVoiceOffloadConfig", "VibeVoiceGenerateDialog")
API_WORKFLOW = REPO_ROOT / "example_workflows" / "vibevoice_dialog_api.json"
UI_WORKFLOW = REPO_ROOT / "example_workflows" / "vibevoice_dialog.json"
SERVER_MODEL = "VibeVoice-tiny-test"  # no tokenizer files: ComfyUI's bundled Qwen2.5 one is used
VOICE_FILES = ("vibevoice_speaker_1.wav", "vibevoice_speaker_2.wav")
SCRIPT = "Speaker 1: Hello there, how are you?\nSpeaker 2: Fine, thanks."
# 2**-7 s: exact in binary, 187.5 samples -> 47 frames of the tiny model's 4-sample hop
SHORT_SECONDS = 2**-7
SHORT_FRAMES = 47
LONG_SECONDS = 5.0  # 30,000 frames: minutes on a CPU, so a cancel lands mid-generation


def write_voices(folder: Path) -> list[Path]:
    """Two small clips of different rates and channel counts (the tiny model's hop is 4 samples)."""
    import soundfile as sf

    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    one = folder / VOICE_FILES[0]
    two = folder / VOICE_FILES[1]
    sf.write(one, (rng.standard_normal(96) * 0.2).astype(np.float32), 24000, subtype="PCM_16")
    sf.write(two, (rng.standard_normal((64, 2)) * 0.2).astype(np.float32), 16000, subtype="PCM_16")
    return [one, two]


def api_graph(*, seed: int, max_seconds: float = SHORT_SECONDS, model: str = SERVER_MODEL, prefix: str | None = None, **config) -> dict:
    graph = json.loads(API_WORKFLOW.read_text())
    graph["4"]["inputs"]["model"] = model
    graph["4"]["inputs"]["dtype"] = "fp32"
    graph["5"]["inputs"].update(script=SCRIPT, seed=seed, max_seconds=max_seconds, steps=2)
    graph["3"]["inputs"].update(config)
    graph["6"]["inputs"]["filename_prefix"] = prefix or f"vibevoice-test/{uuid.uuid4().hex[:8]}"
    return graph


def stats_of(entry: dict) -> dict:
    (stats,) = entry["outputs"]["5"]["vibevoice_stats"]
    return stats


def assert_success(entry: dict) -> None:
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], json.dumps(status["messages"])[-3000:]


def wait_for_log(server, text: str, since: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log_text(since):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} did not appear in the server log:\n{server.log_tail()}")
        time.sleep(0.1)


# ---- through a running ComfyUI --------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(comfy_server):
    """The shared server with a tiny speaking checkpoint in models/vibevoice and two voices in input/."""
    from vibevoice_offload.synthetic import write_demo_checkpoint

    model_dir = comfy_server.models_dir / SERVER_MODEL
    if not model_dir.exists():
        write_demo_checkpoint(model_dir)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / name).unlink()
    write_voices(comfy_server.input_dir)
    return comfy_server


def test_server_boots_with_the_three_nodes(server):
    info = server.object_info()
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing from /object_info"
    log = server.log_text(until=server.boot_mark)  # the start-up only: later tests may log errors on purpose
    assert f"seconds: {server.base_dir / 'custom_nodes' / PACK_FOLDER_NAME}" in log, log[-4000:]  # imported at start-up
    for marker in ("IMPORT FAILED", "Cannot import", "Error while calling comfy_entrypoint", "Traceback"):
        assert marker not in log, log[-4000:]


def test_object_info_types_and_tooltips(server):
    info = server.object_info()
    loader, config, generate = (info[n] for n in NODE_IDS)
    for node in (loader, config, generate):
        assert node["category"] == "audio/VibeVoice"
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node['name']}.{name} has no tooltip"

    assert loader["display_name"] == "Load VibeVoice (Offloaded)"
    assert loader["output"] == ["VIBEVOICE_MODEL"]
    model_spec = loader["input"]["required"]["model"]
    assert SERVER_MODEL in (model_spec[1].get("options") or model_spec[0])
    assert loader["input"]["optional"]["offload_config"][0] == "OFFLOAD_CONFIG"

    assert config["display_name"] == "Offload Config"
    assert config["output"] == ["OFFLOAD_CONFIG"]
    assert set(config["input"]["required"]) == {
        "mode", "preset", "resident_layers", "stream_dtype", "prefetch_depth", "pinned", "target_utilisation"}
    assert config["input"]["required"]["target_utilisation"][1]["default"] == 0.9

    assert generate["display_name"] == "Generate Dialog"
    assert generate["output"] == ["AUDIO", "STRING"]
    required, optional = generate["input"]["required"], generate["input"]["optional"]
    assert required["model"][0] == "VIBEVOICE_MODEL"
    assert required["script"][0] == "STRING" and required["script"][1]["multiline"]
    assert [optional[f"speaker_{i}"][0] for i in range(1, 5)] == ["AUDIO"] * 4
    assert required["cfg"][0] == "FLOAT" and required["cfg"][1]["default"] == 1.3
    assert required["steps"][0] == "INT" and required["steps"][1]["default"] == 10
    assert required["seed"][0] == "INT" and required["seed"][1]["control_after_generate"]
    assert required["max_seconds"][0] == "FLOAT"


def test_workflow_produces_audio(server):
    mark = server.log_mark()
    entry = server.wait(server.queue(api_graph(seed=1)), timeout=300)
    assert_success(entry)
    (saved,) = entry["outputs"]["6"]["audio"]
    import soundfile as sf

    path = server.output_dir / saved["subfolder"] / saved["filename"]
    audio, rate = sf.read(path)
    assert rate == 24000
    assert len(audio) == SHORT_FRAMES * 4  # the tiny model's hop is 4 samples
    assert np.abs(audio).max() > 0

    stats = stats_of(entry)
    assert stats["frames"] == SHORT_FRAMES and stats["model"] == SERVER_MODEL
    assert stats["resident_layers"] == stats["num_layers"] == 4  # --cpu: ComfyUI grants everything
    assert stats["weights_on_device_bytes"] > 0 and not stats["pinned"]
    # the folder has no tokenizer: ComfyUI's bundled Qwen2.5 one served it, offline
    assert stats["tokenizer"] == "qwen25_tokenizer"
    assert f"VibeVoice: generating up to {SHORT_FRAMES} frames" in server.log_text(mark)


def test_interrupt_mid_generation_then_next_prompt_succeeds(server):
    mark = server.log_mark()
    prompt_id = server.queue(api_graph(seed=2, max_seconds=LONG_SECONDS))
    wait_for_log(server, "VibeVoice: generating up to 30000 frames", mark)
    time.sleep(1.0)  # some frames in
    cancelled_at = time.monotonic()
    server.interrupt()
    entry = server.wait(prompt_id, timeout=60)
    assert time.monotonic() - cancelled_at < 20, "the cancel was not honoured promptly"
    status = entry["status"]
    assert status["status_str"] == "error" and not status["completed"]
    assert any(kind == "execution_interrupted" for kind, _ in status["messages"]), status["messages"]
    assert "6" not in entry["outputs"] and "5" not in entry["outputs"]  # no partial audio, nothing cached

    after = server.wait(server.queue(api_graph(seed=3)), timeout=300)
    assert_success(after)
    stats = stats_of(after)
    assert stats["frames"] == SHORT_FRAMES and stats["was_loaded"]  # the engine stayed loaded across the cancel


def test_free_unloads_and_the_next_run_reloads(server):
    assert_success(server.wait(server.queue(api_graph(seed=4)), timeout=300))
    mark = server.log_mark()
    server.free(unload_models=True)
    wait_for_log(server, f"VibeVoice: unloaded {SERVER_MODEL}", mark)

    entry = server.wait(server.queue(api_graph(seed=5)), timeout=300)
    assert_success(entry)
    stats = stats_of(entry)
    assert not stats["was_loaded"] and stats["weights_on_device_before_bytes"] == 0
    assert stats["weights_on_device_bytes"] > 0

    again = server.wait(server.queue(api_graph(seed=6)), timeout=300)
    assert_success(again)
    assert stats_of(again)["was_loaded"]


def test_free_memory_drops_the_model_and_a_rerun_loads_it_again(server):
    mark = server.log_mark()
    server.free(unload_models=True, free_memory=True)  # also drops every cached node output
    time.sleep(1.0)
    entry = server.wait(server.queue(api_graph(seed=7)), timeout=300)
    assert_success(entry)
    assert not stats_of(entry)["was_loaded"]
    assert "Potential memory leak" not in server.log_text(mark)


def test_no_memory_leak_warning_in_the_whole_session(server):
    log = server.log_text()
    assert "Potential memory leak" not in log
    assert "memory leak with model" not in log


# ---- in this process: ComfyUI's model management and the patcher ------------------------------------

PACK = "vibevoice_offload_pack"


@pytest.fixture(scope="module")
def comfy(comfyui_dir):
    """ComfyUI's modules in this process, --cpu unless a GPU is there (as its unit tests do)."""
    import torch

    path = str(comfyui_dir)
    if path not in sys.path:
        sys.path.append(path)  # after the repo root: our `nodes` package stays ours
    from comfy.cli_args import args

    if "comfy.model_management" not in sys.modules:
        args.cpu = not torch.cuda.is_available()
    import comfy.model_management as mm
    import comfy.model_patcher

    return SimpleNamespace(mm=mm, model_patcher=comfy.model_patcher, args=args)


def _import_pack():
    """The repo as a package, the way ComfyUI imports a custom node folder."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)


@pytest.fixture(scope="module")
def pack(comfy):
    """The pack with its nodes package (which needs ComfyUI's comfy_api)."""
    _import_pack()
    nodes = sys.modules.get(f"{PACK}.nodes")
    if nodes is not None and not hasattr(nodes, "comfy_entrypoint"):  # left bare by pack_core
        spec = importlib.util.spec_from_file_location(f"{PACK}.nodes", REPO_ROOT / "nodes" / "__init__.py")
        spec.loader.exec_module(nodes)
    return SimpleNamespace(
        mp=importlib.import_module(f"{PACK}.nodes.model_patcher"),
        nodes=importlib.import_module(f"{PACK}.nodes"),
        loader=importlib.import_module(f"{PACK}.nodes.loader"),
        synthetic=importlib.import_module(f"{PACK}.vibevoice_offload.synthetic"),
        pipeline=importlib.import_module(f"{PACK}.vibevoice_offload.pipeline"),
        frame_loop=importlib.import_module(f"{PACK}.vibevoice_offload.frame_loop"),
    )


@pytest.fixture(scope="module")
def pack_core(comfy):
    """Only the model patcher (comfy.model_management and comfy.model_patcher, no comfy_api:
    fewer dependencies, for the GPU machine)."""
    import types

    _import_pack()
    name = f"{PACK}.nodes"
    if name not in sys.modules:  # a bare package: nodes/__init__.py (the node classes) not run
        bare = types.ModuleType(name)
        bare.__path__ = [str(REPO_ROOT / "nodes")]
        bare.__package__ = name
        sys.modules[name] = bare
    return SimpleNamespace(
        mp=importlib.import_module(f"{name}.model_patcher"),
        synthetic=importlib.import_module(f"{PACK}.vibevoice_offload.synthetic"),
        pipeline=importlib.import_module(f"{PACK}.vibevoice_offload.pipeline"),
        frame_loop=importlib.import_module(f"{PACK}.vibevoice_offload.frame_loop"),
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, pack):
    root = tmp_path_factory.mktemp("vibevoice-models")
    four = pack.synthetic.write_demo_checkpoint(root / "tiny-4")
    eight = pack.synthetic.write_demo_checkpoint(root / "tiny-8", layers=8)
    return SimpleNamespace(root=root, four=four, eight=eight)


@pytest.fixture()
def voices():
    import torch

    g = torch.Generator().manual_seed(1)
    return {1: (torch.randn(1, 1, 40, generator=g) * 0.1, 24000), 2: (torch.randn(1, 2, 30, generator=g) * 0.1, 16000)}


@pytest.fixture()
def clean_models(comfy):
    """Leave ComfyUI's list of loaded models as found."""
    before = list(comfy.mm.current_loaded_models)
    yield
    for loaded in list(comfy.mm.current_loaded_models):
        if loaded not in before:
            comfy.mm.current_loaded_models.remove(loaded)
            if loaded.model is not None:
                loaded.model.detach()


def make_patcher(pack, model_dir, device, dtype="fp32"):
    import torch

    vv = pack.pipeline.VibeVoice.load(model_dir, dtype=dtype)
    return pack.mp.VibeVoicePatcher(vv, device, torch.device("cpu"), key=(str(model_dir), dtype))


def settings(pack, **kw):
    return pack.mp.OffloadSettings(**kw)


def gen_settings(pack, seed=0, frames=6):
    return pack.frame_loop.GenerationSettings(steps=2, seed=seed, max_frames=frames)


def assert_counters_true(patcher):
    engine_bytes = patcher.engine.resident_bytes if patcher.engine is not None and patcher.engine.loaded else 0
    assert patcher.loaded_size() == patcher.model.model_loaded_weight_memory == engine_bytes


def test_auto_spends_the_prompts_vram_on_the_frames_and_presets_do_not(pack, model_dirs, monkeypatch):
    """On a GPU, `auto` gives the engine the planner's frame extension for the run's workload
    (here long voice clips, whose encoding needs far more than the tiny model's layers);
    manual and preset settings run exactly the layers they name."""
    import torch

    planner = importlib.import_module(f"{PACK}.vibevoice_offload.planner")
    patcher = make_patcher(pack, model_dirs.eight, torch.device("cpu"))
    patcher._place(2)
    monkeypatch.setattr(type(patcher), "engine_device", property(lambda self: torch.device("cuda", 0)))
    # a link slow enough (1 MB/s) that the tiny model's 38 KB layers bound the frame, as a
    # real model's do on a real link
    monkeypatch.setattr(planner, "link_bandwidth_gbps", lambda *a, **k: 0.001)
    cp = patcher.vibevoice.checkpoint
    work = planner.Workload((24_000 * 600, 24_000 * 600), 60, 8)
    expected = planner.with_frame_extension(cp.config, patcher.engine.plan, cp.dtype, work, planner.link_bandwidth_gbps())
    assert expected.frame_layers + expected.frame_slots > 0
    patcher._plan_frame_extension(settings(pack), work)
    assert (patcher.engine.plan.frame_layers, patcher.engine.plan.frame_slots) == (expected.frame_layers, expected.frame_slots)
    for other in (settings(pack, mode="manual", resident_layers=2), settings(pack, mode="preset", preset="extreme")):
        patcher._plan_frame_extension(other, work)
        assert (patcher.engine.plan.frame_layers, patcher.engine.plan.frame_slots) == (0, 0)
    patcher._close_engine()


def test_patcher_counters_equal_the_engines_resident_bytes(pack, model_dirs):
    import torch

    patcher = make_patcher(pack, model_dirs.eight, torch.device("cpu"))
    assert patcher.model_size() == patcher.size == patcher.vibevoice.checkpoint.nbytes
    assert patcher.loaded_size() == 0
    patcher.configure(settings(pack, target_utilisation=1.0))  # exact arithmetic below

    patcher.load(torch.device("cpu"), lowvram_model_memory=0, full_load=True)
    assert patcher.resident_layers() == 8
    assert_counters_true(patcher)
    full = patcher.loaded_size()
    layer = patcher.engine.native.nbytes

    freed = patcher.partially_unload(torch.device("cpu"), 3 * layer)
    assert_counters_true(patcher)
    assert freed == full - patcher.loaded_size() >= 3 * layer
    assert patcher.resident_layers() == 3  # 8 -> 3: five layers leave, two ring slots arrive
    assert patcher.model.model_lowvram

    gained = patcher.partially_load(torch.device("cpu"), extra_memory=2 * layer)
    assert_counters_true(patcher)
    assert gained == 2 * layer and patcher.resident_layers() == 5

    before = patcher.loaded_size()
    assert patcher.partially_load(torch.device("cpu"), extra_memory=1e32) == full - before
    assert_counters_true(patcher)
    assert patcher.resident_layers() == 8 and patcher.loaded_size() == full

    patcher.detach(unpatch_all=False)  # ComfyUI re-registering a model it is about to load
    assert patcher.loaded_size() == full
    patcher.detach(unpatch_all=True)
    assert_counters_true(patcher)
    assert patcher.loaded_size() == 0 and not patcher.engine.loaded
    assert patcher.current_loaded_device() == torch.device("cpu")


@pytest.mark.parametrize("stream_dtype", ["bf16", "fp8", "bf16-packed"])
def test_weight_estimate_is_the_engines_count(pack, model_dirs, stream_dtype):
    """The bytes the patcher expects for n resident layers, before and after loading, are
    exactly what the engine then holds: a ring of bf16 slots, or staging slots and, in auto
    (decoded on use), one weight-sized buffer, in manual (decoded ahead) two decoded layers."""
    import torch

    patcher = make_patcher(pack, model_dirs.eight, torch.device("cpu"), dtype="bf16")
    for mode in ("manual", "auto"):
        patcher.configure(settings(pack, mode=mode, resident_layers=8, stream_dtype=stream_dtype, prefetch_depth=3))
        before_load = [patcher.weight_bytes(n) for n in range(9)]
        for n in range(8, -1, -1):
            expected = patcher.weight_bytes(n)
            patcher._place(n)
            assert before_load[n] == expected == patcher.engine.resident_bytes == patcher.loaded_size(), (mode, n)
        engine = patcher.engine
        staging = 3 * engine.stream_layout.nbytes
        if stream_dtype == "bf16":
            assert engine.slot_bytes == staging
        elif mode == "manual":
            assert engine.slot_bytes == staging + 2 * engine.native.nbytes
        else:
            assert staging < engine.slot_bytes < staging + engine.native.nbytes


def test_plan_route_prices_the_ring_the_node_runs(pack, monkeypatch):
    """On a GPU the plan route plans the node's engine: auto decodes staged layers on use
    (Large fp8 in 8 GB, where two compute buffers are refused), a preset a layer ahead (the
    planner's own preset plan, to the byte)."""
    import torch

    routes = importlib.import_module(f"{PACK}.nodes.routes")
    planner = importlib.import_module(f"{PACK}.vibevoice_offload.planner")
    config = planner.load_size_config("Large")
    workload = planner.Workload.for_minutes(5)
    monkeypatch.setattr(routes, "_device_memory", lambda: (80 * 2**30, 8 * 10**9))
    auto = routes.compute_plan({"size": "Large", "mode": "auto", "stream_dtype": "fp8", "minutes": 5, "target_utilisation": 1.0})
    assert auto["error"] is None and auto["streamed_layers"] > 0 and auto["estimated_vram_bytes"] <= 8 * 10**9
    with pytest.raises(planner.PlanError, match=r"streaming every decoder layer needs .*decoded a layer ahead\)"):
        planner.plan_auto(config, 8 * 10**9, stream_dtype="fp8", prefetch_depth=2, workload=workload, link_gbps=32.0, compute_buffers=2)

    monkeypatch.setattr(routes, "_device_memory", lambda: (80 * 2**30, 16 * 10**9))
    preset = routes.compute_plan({"size": "Large", "mode": "preset", "preset": "balanced", "stream_dtype": "fp8", "minutes": 5})
    ahead = planner.plan_preset(config, "balanced", stream_dtype="fp8")
    assert ahead.compute_buffers == 2 and preset["error"] is None
    assert preset["estimated_vram_bytes"] == int(planner.estimate_for_workload(config, ahead, torch.bfloat16, workload).total_vram)


def test_budget_holds_even_when_the_estimate_is_wrong(pack, model_dirs, monkeypatch):
    """The engine's real count, not the estimate, has the last word on ComfyUI's budget."""
    import torch

    patcher = make_patcher(pack, model_dirs.eight, torch.device("cpu"))
    patcher.configure(settings(pack, target_utilisation=1.0))
    patcher.load(torch.device("cpu"), full_load=True)
    layer = patcher.engine.native.nbytes
    budget = patcher.weight_bytes(3)
    patcher.detach()
    monkeypatch.setattr(patcher, "weight_bytes", lambda n, encoded=None: 0)  # "everything fits"
    patcher.partially_load(torch.device("cpu"), extra_memory=budget)
    assert patcher.loaded_size() <= budget and patcher.resident_layers() == 3
    freed = patcher.partially_unload(torch.device("cpu"), 2 * layer)
    assert freed >= 2 * layer and patcher.loaded_size() <= budget - 2 * layer
    assert_counters_true(patcher)


def test_packed_streaming_in_comfyui_writes_the_bf16_audio(pack, model_dirs, voices, clean_models):
    """The node's bf16-packed choice streams the same bits as bf16 (and says which it ran),
    its resident layers kept packed on the device."""
    import torch

    patcher = make_patcher(pack, model_dirs.eight, torch.device("cpu"), dtype="bf16")
    runs = {}
    for stream_dtype in ("bf16", "bf16-packed"):
        audio, stats = patcher.generate(settings(pack, mode="manual", resident_layers=3, stream_dtype=stream_dtype), SCRIPT, voices, gen_settings(pack))
        assert stats["stream_dtype"] == stream_dtype and stats["engine"]["offload_streamed_layers"] == 5
        assert stats["engine"]["offload_encoded_residents"] == (stream_dtype == "bf16-packed")
        runs[stream_dtype] = audio
    assert_counters_true(patcher)
    assert torch.equal(runs["bf16"].waveform, runs["bf16-packed"].waveform)


def test_packed_streaming_keeps_every_layer_decoded_where_the_grant_holds_them(pack, model_dirs, voices, clean_models):
    """bf16-packed in auto: a grant that holds every layer decoded keeps them decoded (packed
    residents would be decoded every frame with nothing streaming); when ComfyUI takes VRAM
    back, the layers that stay are packed; given everything again, they are decoded again.
    The counters stay true across the switches and the audio is bf16's, bit for bit."""
    import torch

    patcher = make_patcher(pack, model_dirs.eight, torch.device("cpu"), dtype="bf16")
    patcher.configure(settings(pack, stream_dtype="bf16-packed", target_utilisation=1.0))
    patcher.load(torch.device("cpu"), full_load=True)
    assert patcher.resident_layers() == 8 and not patcher.engine.plan.encoded_residents
    assert_counters_true(patcher)
    everything = patcher.loaded_size()
    assert everything == patcher.weight_bytes(8, False)

    wanted = everything - patcher.weight_bytes(3)
    freed = patcher.partially_unload(torch.device("cpu"), wanted)
    assert freed >= wanted and patcher.resident_layers() == 3 and patcher.engine.plan.encoded_residents
    assert_counters_true(patcher)

    patcher.partially_load(torch.device("cpu"), extra_memory=1e32)
    assert patcher.resident_layers() == 8 and not patcher.engine.plan.encoded_residents
    assert patcher.loaded_size() == everything
    assert_counters_true(patcher)

    runs = {}
    for stream_dtype in ("bf16", "bf16-packed"):
        audio, stats = patcher.generate(settings(pack, stream_dtype=stream_dtype), SCRIPT, voices, gen_settings(pack))
        assert stats["engine"]["offload_streamed_layers"] == 0 and not stats["engine"]["offload_encoded_residents"]
        runs[stream_dtype] = audio
    assert torch.equal(runs["bf16"].waveform, runs["bf16-packed"].waveform)
    assert_counters_true(patcher)


def test_fp8_audio_does_not_depend_on_what_was_streamed_before(pack, model_dirs, voices, clean_models):
    """fp8 rounds the layers it streams, and their fp8 copy is then the only one in host RAM.
    When ComfyUI takes VRAM back (layers become streamed) and gives it again, when a config
    streams fewer layers, and when the stream dtype goes back to bf16, the layers that
    become resident are read from disk again: every run with all layers resident is the
    fresh model's audio, bit for bit."""
    import torch

    patcher = make_patcher(pack, model_dirs.eight, torch.device("cpu"))
    everything = settings(pack, mode="manual", resident_layers=8)
    fresh, _ = patcher.generate(everything, SCRIPT, voices, gen_settings(pack))
    fp8 = settings(pack, mode="manual", resident_layers=8, stream_dtype="fp8")
    runs = [patcher.generate(fp8, SCRIPT, voices, gen_settings(pack))[0]]

    freed = patcher.partially_unload(torch.device("cpu"), patcher.loaded_size() - patcher.weight_bytes(3))
    assert freed > 0 and patcher.resident_layers() == 3
    patcher.partially_load(torch.device("cpu"), extra_memory=1e32)
    assert patcher.resident_layers() == 8
    assert_counters_true(patcher)
    runs.append(patcher.generate(fp8, SCRIPT, voices, gen_settings(pack))[0])

    streamed, stats = patcher.generate(settings(pack, mode="manual", resident_layers=2, stream_dtype="fp8"), SCRIPT, voices, gen_settings(pack))
    assert stats["engine"]["offload_streamed_layers"] == 6
    runs.append(patcher.generate(fp8, SCRIPT, voices, gen_settings(pack))[0])
    runs.append(patcher.generate(everything, SCRIPT, voices, gen_settings(pack))[0])  # a new bf16 engine
    assert not torch.equal(streamed.waveform, fresh.waveform)  # streamed layers do run rounded
    assert all(torch.equal(run.waveform, fresh.waveform) for run in runs)
    assert_counters_true(patcher)


def test_manual_and_preset_configs_apply_at_run_time(pack, model_dirs, voices, clean_models):
    import torch

    patcher = make_patcher(pack, model_dirs.eight, torch.device("cpu"))
    _, stats = patcher.generate(settings(pack, mode="manual", resident_layers=2), SCRIPT, voices, gen_settings(pack))
    assert stats["resident_layers"] == 2 and stats["engine"]["offload_streamed_layers"] == 6
    assert_counters_true(patcher)
    _, stats = patcher.generate(settings(pack, mode="preset", preset="moderate"), SCRIPT, voices, gen_settings(pack))
    assert stats["resident_layers"] == 4
    _, stats = patcher.generate(settings(pack, stream_dtype="fp8"), SCRIPT, voices, gen_settings(pack))
    assert stats["resident_layers"] == 8 and stats["stream_dtype"] == "fp8"
    _, stats = patcher.generate(settings(pack, mode="manual", resident_layers=3), SCRIPT, voices, gen_settings(pack))
    assert stats["resident_layers"] == 3 and stats["stream_dtype"] == "bf16"
    assert_counters_true(patcher)
    engine = patcher.engine
    _, stats = patcher.generate(settings(pack, mode="manual", resident_layers=3, prefetch_depth=3), SCRIPT, voices, gen_settings(pack))
    assert patcher.engine is engine and engine.plan.prefetch_depth == stats["prefetch_depth"] == 3  # same slabs, new ring
    assert_counters_true(patcher)


def test_loaders_share_one_patcher_per_weights_and_dtype(pack, comfy, model_dirs):
    import folder_paths

    folder_paths.add_model_folder_path("vibevoice", str(model_dirs.root))
    loader = pack.loader.VibeVoiceOffloadLoader
    manual = settings(pack, mode="manual", resident_layers=1)
    a = loader.execute(model="tiny-4", dtype="fp32", offload_config=manual).result[0]
    b = loader.execute(model="tiny-4", dtype="fp32").result[0]
    c = loader.execute(model="tiny-4", dtype="bf16").result[0]
    assert a.patcher is b.patcher is pack.mp.get_patcher(model_dirs.four, "fp32")
    assert c.patcher is not a.patcher
    assert a.offload == manual and b.offload == settings(pack)
    assert a.get_ram_usage() == a.patcher.size > 0
    # the registry is weak: when no handle is left the host copy goes
    ref = weakref.ref(c.patcher)
    del c
    assert ref() is None


def test_another_model_takes_vram_and_the_next_run_reclaims_it(pack, comfy, model_dirs, voices, fake_gpu):
    """ComfyUI's load_models_gpu/free_memory on a simulated GPU: loading another model makes
    ours give up resident layers (partially_unload), our next run takes them back."""
    import torch

    mm = comfy.mm
    ours = make_patcher(pack, model_dirs.eight, fake_gpu.device)
    fake_gpu.models.append(ours)
    auto = settings(pack, target_utilisation=1.0)
    ours.configure(auto)
    full = ours.weight_bytes(8)
    fake_gpu.total = int(mm.minimum_inference_memory()) + full + 1024  # room for all 8 layers, not more

    _, stats = ours.generate(auto, SCRIPT, voices, gen_settings(pack, seed=1))
    assert stats["resident_layers"] == 8
    assert_counters_true(ours)
    layer = ours.engine.native.nbytes

    other_module = torch.nn.Linear(5 * layer // 8, 1, bias=False)  # fp32: 2.5 decoder layers of bytes
    other = comfy.model_patcher.ModelPatcher(other_module, load_device=fake_gpu.device, offload_device=torch.device("cpu"))
    fake_gpu.models.append(other)
    mm.load_models_gpu([other], memory_required=0)

    assert other.loaded_size() == other.model_size()  # the other model got its VRAM...
    assert_counters_true(ours)  # ...from ours, which reports what it really holds
    assert 0 < ours.resident_layers() < 8
    assert ours.loaded_size() + other.loaded_size() <= fake_gpu.total - mm.minimum_inference_memory()
    assert ours.loaded_size() == ours.weight_bytes(ours.resident_layers())
    assert ours.engine.loaded

    result, stats = ours.generate(auto, SCRIPT, voices, gen_settings(pack, seed=2))
    assert result.waveform.numel() == 6 * 4
    assert stats["resident_layers"] == 8 and stats["was_loaded"]  # reclaimed
    assert stats["weights_on_device_before_bytes"] < stats["weights_on_device_bytes"] == full
    assert_counters_true(ours)
    assert other.loaded_size() == 0  # ComfyUI unloaded the other model to make room


def test_streamed_run_after_eviction_matches_resident_run(pack, model_dirs, voices, fake_gpu):
    """The layers given up are streamed, not lost: the same seed gives the same audio."""
    import torch

    ours = make_patcher(pack, model_dirs.eight, fake_gpu.device)
    fake_gpu.models.append(ours)
    fake_gpu.total = 10**12
    auto = settings(pack)
    resident, _ = ours.generate(auto, SCRIPT, voices, gen_settings(pack, seed=5))
    ours.partially_unload(fake_gpu.device, 4 * ours.engine.native.nbytes)
    assert ours.resident_layers() < 8
    ours.configure(settings(pack, mode="manual", resident_layers=ours.resident_layers()))
    streamed, stats = ours.generate(settings(pack, mode="manual", resident_layers=ours.resident_layers()), SCRIPT, voices, gen_settings(pack, seed=5))
    assert stats["engine"]["offload_streamed_layers"] > 0
    assert torch.equal(resident.waveform, streamed.waveform)


def test_cancel_propagates_and_the_next_run_works(pack, comfy, model_dirs, voices, clean_models):
    import torch

    mm = comfy.mm
    patcher = make_patcher(pack, model_dirs.four, torch.device("cpu"))
    auto = settings(pack)
    patcher.generate(auto, SCRIPT, voices, gen_settings(pack))
    before = patcher.loaded_size()
    frames_seen = []

    def cancel_on_third(frame, total, chunk):
        frames_seen.append(frame)
        if frame == 3:
            mm.interrupt_current_processing()
        mm.throw_exception_if_processing_interrupted()

    with pytest.raises(mm.InterruptProcessingException):
        patcher.generate(auto, SCRIPT, voices, gen_settings(pack, frames=1000), on_frame=cancel_on_third)
    assert frames_seen == [1, 2, 3]
    assert not mm.processing_interrupted()
    assert patcher.loaded_size() == before and patcher.engine.loaded  # stays loaded, as ComfyUI expects
    result, stats = patcher.generate(auto, SCRIPT, voices, gen_settings(pack))
    assert result.waveform.numel() == 6 * 4 and stats["was_loaded"]


def test_a_dropped_model_leaves_no_leak_warning(pack, comfy, model_dirs, voices, caplog):
    import gc

    import torch

    mm = comfy.mm
    patcher = make_patcher(pack, model_dirs.four, torch.device("cpu"))
    patcher.generate(settings(pack), SCRIPT, voices, gen_settings(pack))
    assert any(lm.model is patcher for lm in mm.current_loaded_models)
    module = weakref.ref(patcher.model)
    del patcher
    assert module() is None  # the module does not outlive its patcher (no reference cycle)
    with caplog.at_level(logging.INFO):
        mm.cleanup_models_gc()
        gc.collect()
    assert "memory leak" not in caplog.text
    assert all(lm.model is not None for lm in mm.current_loaded_models)


def test_disable_pinned_memory_is_respected(pack, comfy, monkeypatch):
    import torch

    cuda = torch.device("cuda", 0)
    assert pack.mp.pinning_allowed(cuda)
    assert not pack.mp.pinning_allowed(torch.device("cpu"))
    monkeypatch.setattr(comfy.args, "disable_pinned_memory", True)
    assert not pack.mp.pinning_allowed(cuda)


@pytest.fixture()
def fake_gpu(comfy, monkeypatch):
    """A GPU simulated on the CPU for ComfyUI's model management: the device cpu:0 (which
    torch runs on the CPU) is not "the CPU" to ComfyUI, and its free memory is `total`
    minus what the registered models report loaded. NORMAL_VRAM, no minimum weight share
    (as on NVIDIA). Everything else (load_models_gpu, free_memory, LoadedModel) is ComfyUI's."""
    import torch

    mm = comfy.mm
    device = torch.device("cpu", 0)
    fake = SimpleNamespace(device=device, total=0, models=[])
    real_free, real_is_cpu = mm.get_free_memory, mm.is_device_cpu

    def get_free_memory(dev=None, torch_free_too=False):
        if dev != device:
            return real_free(dev, torch_free_too)
        free = fake.total - sum(m.loaded_size() for m in fake.models)
        return (free, 0) if torch_free_too else free

    monkeypatch.setattr(mm, "get_free_memory", get_free_memory)
    monkeypatch.setattr(mm, "is_device_cpu", lambda dev: real_is_cpu(dev) and dev != device)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(mm, "MIN_WEIGHT_MEMORY_RATIO", 0.0)
    before = list(mm.current_loaded_models)
    yield fake
    mm.free_memory(1e30, device)
    for loaded in list(mm.current_loaded_models):
        if loaded not in before:
            mm.current_loaded_models.remove(loaded)
    fake.models.clear()


def test_ui_workflow_is_the_api_workflow_with_positions():
    """example_workflows/vibevoice_dialog.json (the frontend's format, for the template
    browser and the browser tests) has the same nodes, links and values as the API one."""
    api = json.loads(API_WORKFLOW.read_text())
    ui = json.loads(UI_WORKFLOW.read_text())
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert {k: n["type"] for k, n in nodes.items()} == {k: v["class_type"] for k, v in api.items()}
    ui_links = set()
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        ui_links.add((str(src), src_slot, str(dst), nodes[str(dst)]["inputs"][dst_slot]["name"]))
    api_links = {(v[0], v[1], dst, name) for dst, node in api.items() for name, v in node["inputs"].items() if isinstance(v, list)}
    assert ui_links == api_links
    for key, node in nodes.items():
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        literals = [v for v in api[key]["inputs"].values() if not isinstance(v, list)]
        values = [v for v in node["widgets_values"] if v not in (None, "", "randomize")]
        assert values == literals, key


# ---- on a real GPU: the same, measured in VRAM ------------------------------------------------------

def _vram_report(name: str, rows: dict) -> None:
    """GPU measurements as JSON in test-artifacts/ (and the test's output)."""
    from comfy_server import ARTIFACTS_DIR

    ARTIFACTS_DIR.mkdir(exist_ok=True)
    path = ARTIFACTS_DIR / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


@pytest.mark.gpu
@pytest.mark.parametrize("stream_dtype", ["bf16", "bf16-packed"])
def test_real_vram_follows_comfyui_eviction_cancel_and_reclaim(pack_core, comfy, tmp_path, stream_dtype):
    """On a CUDA device, with ComfyUI's real free-memory readings: the counters equal the
    VRAM the engine really holds (torch.cuda.memory_allocated deltas), another model's
    load makes ours give up resident layers, a cancel returns VRAM to its pre-run level,
    and the next run reclaims the layers. bf16-packed: evicted, the layers left resident
    are packed and the streamed ones decoded on use, and the audio is still bf16's."""
    import torch

    mm = comfy.mm
    pk = pack_core
    device = mm.get_torch_device()
    assert device.type == "cuda"
    allocated = lambda: torch.cuda.memory_allocated(device)  # noqa: E731
    tolerance = 2 * 2**20

    def close(measured: int, counted: int, buffers: int) -> bool:
        # The caching allocator hands out whole blocks: a buffer over 1 MiB may keep its
        # block's unsplit remainder (under 1 MiB), or not when it is carved from a bigger
        # cached block, so each buffer allocated or freed counts up to 1 MiB more or less
        # than its bytes (seen: 1.04 MB per 55.6 MB layer). 2% covers the small tensors.
        return abs(measured - counted) <= buffers * 2**20 + 0.02 * max(abs(measured), abs(counted))
    rows: dict = {"device": torch.cuda.get_device_name(device)}

    # 8 decoder layers of about 55 MB (bf16): big enough that the numbers mean something
    model_dir = pk.synthetic.write_demo_checkpoint(tmp_path / "mid", hidden_size=1024, intermediate_size=8192, layers=8, heads=16, kv_heads=4)
    # The tokenizer beside the model folder: transformers 5.17's AutoTokenizer would read
    # the original-layout config.json of a model folder that holds one.
    (tmp_path / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).rename(tmp_path / "tokenizer" / name)
    vv = pk.pipeline.VibeVoice.load(model_dir, dtype="bf16")
    patcher = pk.mp.VibeVoicePatcher(vv, device, torch.device("cpu"), key=(str(model_dir), "bf16"))
    auto = pk.mp.OffloadSettings(target_utilisation=1.0, stream_dtype=stream_dtype)
    g = torch.Generator().manual_seed(1)
    voices = {1: (torch.randn(1, 1, 40, generator=g) * 0.1, 24000), 2: (torch.randn(1, 2, 30, generator=g) * 0.1, 16000)}
    short = pk.frame_loop.GenerationSettings(steps=2, seed=1, max_frames=8)

    # 1. load through ComfyUI: the counter is what really arrived in VRAM
    torch.cuda.synchronize()
    base = allocated()
    patcher.configure(auto)
    mm.load_models_gpu([patcher], memory_required=patcher.run_memory(100, [40, 20], 8))
    loaded = patcher.loaded_size()
    rows["load"] = {"counter": loaded, "allocated_delta": allocated() - base, "resident_layers": patcher.resident_layers()}
    assert patcher.resident_layers() == 8
    assert close(allocated() - base, loaded, buffers=8)  # the layers
    layer = patcher.engine.native.nbytes

    # 2. a run, then a run cancelled at its third frame: VRAM back to the pre-run level
    result, stats = patcher.generate(auto, SCRIPT, voices, short)
    assert result.waveform.numel() == 8 * 4  # the synthetic model's hop is 4 samples
    assert stats["pinned"]  # CUDA and no --disable-pinned-memory
    torch.cuda.synchronize()
    before_run = allocated()
    torch.cuda.reset_peak_memory_stats(device)

    def cancel_on_third(frame, total, chunk):
        if frame == 3:
            mm.interrupt_current_processing()
        mm.throw_exception_if_processing_interrupted()

    with pytest.raises(mm.InterruptProcessingException):
        patcher.generate(auto, SCRIPT, voices, pk.frame_loop.GenerationSettings(steps=2, seed=2, max_frames=500), on_frame=cancel_on_third)
    torch.cuda.synchronize()
    rows["cancel"] = {"before_run": before_run, "peak_during_run": torch.cuda.max_memory_allocated(device), "after_cancel": allocated()}
    assert torch.cuda.max_memory_allocated(device) > before_run  # the run did use VRAM...
    assert abs(allocated() - before_run) <= tolerance  # ...and gave it all back
    assert patcher.loaded_size() == loaded

    # 3. leave ComfyUI just the inference reserve plus 1.5 layers free, then load another model
    free = mm.get_free_memory(device)
    ballast = torch.empty(int(free - mm.minimum_inference_memory() - 1.5 * layer), dtype=torch.uint8, device=device)
    other = comfy.model_patcher.ModelPatcher(
        torch.nn.Linear(1024, int(2.5 * layer) // 2048, bias=False, dtype=torch.bfloat16),  # 2.5 layers of bytes
        load_device=device, offload_device=torch.device("cpu"))
    before_other = allocated()
    # force_full_load: a plain nn.Linear is not a ComfyUI op, so ComfyUI would otherwise
    # keep it on the CPU unless 3x its size were free for its offload streams
    mm.load_models_gpu([other], force_full_load=True)
    torch.cuda.synchronize()
    given_up = loaded - patcher.loaded_size()
    rows["evicted"] = {
        "other_model_bytes": other.model_size(), "ours_counter": patcher.loaded_size(), "ours_given_up": given_up,
        "resident_layers": patcher.resident_layers(), "allocated_delta": allocated() - before_other,
    }
    assert other.loaded_size() == other.model_size()
    assert 0 < patcher.resident_layers() < 8
    # buffers allocated or freed: the layers given up (bf16-packed: all 8 decoded ones, and
    # the resident ones again, packed), the ring's 2 slots (bf16-packed: and its weight
    # buffer), the other model's weight
    kept = patcher.resident_layers()
    buffers = 8 - kept + 2 + 1 if stream_dtype == "bf16" else 8 + kept + 2 + 1 + 1
    assert close(allocated() - before_other, other.model_size() - given_up, buffers=buffers)
    # both fit in what was there: ours + the other <= ours before + the 1.5 layers left free
    assert patcher.loaded_size() + other.model_size() <= loaded + 1.5 * layer

    # 4. a run while evicted streams the missing layers; the next run after ComfyUI drops
    #    the other model reclaims them (the ballast stays: they fit again without it)
    evicted = pk.mp.OffloadSettings(mode="manual", resident_layers=patcher.resident_layers(), stream_dtype=stream_dtype)
    streamed, stats = patcher.generate(evicted, SCRIPT, voices, short)
    assert stats["engine"]["offload_streamed_layers"] > 0 and stats["engine"]["offload_pinned"]
    assert stats["engine"]["offload_encoded_residents"] == (stream_dtype == "bf16-packed")
    rows["streamed_run"] = {k: v for k, v in stats["engine"].items() if isinstance(v, (int, float))}
    assert torch.equal(streamed.waveform, result.waveform)  # bf16 or bf16-packed streaming: the same audio
    result2, stats = patcher.generate(auto, SCRIPT, voices, short)
    torch.cuda.synchronize()
    rows["reclaimed"] = {"ours_counter": patcher.loaded_size(), "resident_layers": patcher.resident_layers(), "other_loaded": other.loaded_size()}
    assert patcher.resident_layers() == 8 and patcher.loaded_size() == loaded
    assert other.loaded_size() == 0
    assert torch.equal(result2.waveform, result.waveform)

    # 5. /free's unload_all_models: nothing of ours is left in VRAM
    del ballast
    torch.cuda.synchronize()
    before_free = allocated()
    mm.unload_all_models()
    torch.cuda.synchronize()
    rows["unload_all"] = {"freed": before_free - allocated(), "counter_before": loaded, "counter_after": patcher.loaded_size()}
    assert patcher.loaded_size() == 0
    assert close(before_free - allocated(), loaded, buffers=8)
    _vram_report(f"gpu-vram-eviction-{stream_dtype}", rows)
