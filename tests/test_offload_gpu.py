"""The layer offloader on a CUDA GPU: exactness, fp8 error, no steady-state allocation, teardown.

A mid-size synthetic model (hidden 1024, 8 decoder layers of 25 MB in bf16) so copies take
measurable time. Skipped without CUDA (conftest: the `gpu` marker).
"""

from __future__ import annotations

import dataclasses
import gc
import os

import pytest
import torch

from vibevoice_offload.bench_case import first_outputs, relative_error
from vibevoice_offload.cuda_graphs import GraphPool
from vibevoice_offload.executor import ResidentExecutor
from vibevoice_offload.frame_loop import FrameLoop, GenerationSettings
from vibevoice_offload.offload import OffloadEngine
from vibevoice_offload.plan import OffloadPlan
from vibevoice_offload.pipeline import VibeVoice
from vibevoice_offload.prompt import build_prompt

from faults import out_of_memory_on_call

pytestmark = pytest.mark.gpu

SCRIPT = "Speaker 1: Hello there, how are you today?\nSpeaker 2: Fine, thanks!"
LAYERS = 8


@pytest.fixture(scope="module")
def mid_dir(tmp_path_factory):
    from vibevoice_offload.synthetic import write_demo_checkpoint

    return write_demo_checkpoint(
        tmp_path_factory.mktemp("mid") / "VibeVoice-mid", hidden_size=1024, intermediate_size=2816,
        layers=LAYERS, heads=8, kv_heads=2, head_layers=2,
    )


@pytest.fixture(scope="module")
def voices():
    g = torch.Generator().manual_seed(3)
    return {1: (torch.randn(1, 400, generator=g) * 0.1, 24000), 2: (torch.randn(1, 300, generator=g) * 0.1, 24000)}


def load(mid_dir) -> VibeVoice:
    # The tokenizer is built from its file: AutoTokenizer reads config.json through AutoConfig,
    # which misreads an original-layout config (and transformers 5.17 then rejects it).
    from transformers import PreTrainedTokenizerFast

    from vibevoice_offload.checkpoint import load_checkpoint

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(mid_dir / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    return VibeVoice(load_checkpoint(mid_dir, "bf16"), tokenizer, mid_dir)


def resident_reference(mid_dir, voices, settings):
    vv = load(mid_dir)
    vv.model.to("cuda")
    out = vv.generate(SCRIPT, voices, settings, executor=ResidentExecutor(vv.model))
    del vv
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_engine(mid_dir, voices, settings, plan, **capture):
    vv = load(mid_dir)
    engine = OffloadEngine(vv.model, plan, "cuda")
    try:  # a failed run must not leave its VRAM to the next test's baseline
        engine.load()
        out = vv.generate(SCRIPT, voices, settings, executor=engine)
        return out, engine.stats()
    finally:
        engine.close()


def test_bf16_streaming_is_bit_identical_to_resident(mid_dir, voices):
    settings = GenerationSettings(cfg=1.3, steps=5, seed=11, max_frames=12)
    reference = resident_reference(mid_dir, voices, settings)
    full, _ = run_engine(mid_dir, voices, settings, OffloadPlan(LAYERS, "bf16"))
    streamed, stats = run_engine(mid_dir, voices, settings, OffloadPlan(2, "bf16", prefetch_depth=2))
    deep, _ = run_engine(mid_dir, voices, settings, OffloadPlan(0, "bf16", prefetch_depth=3))
    assert reference.waveform.numel() > 0
    assert torch.equal(full.waveform, streamed.waveform)
    assert torch.equal(full.waveform, deep.waveform)
    assert torch.equal(reference.waveform, streamed.waveform), (reference.waveform - streamed.waveform).abs().max()
    assert stats["offload_streamed_layers"] == LAYERS - 2
    assert stats["offload_copies"] >= stats["offload_passes"] * (LAYERS - 2)
    assert stats["offload_link_gbps"] > 0
    print("bf16 stats", stats)


@pytest.mark.parametrize("compute_buffers,encoded", [(2, False), (1, False), (2, True), (1, True)])
def test_packed_streaming_is_bit_identical_to_resident(mid_dir, voices, compute_buffers, encoded):
    """bf16-packed streaming (12 bits a weight, decoded on the GPU by the Triton kernels)
    writes the resident model's bits, every graph on, with fewer bytes per copy than bf16;
    with encoded residents too (the resident layers decoded from their fixed slots)."""
    settings = GenerationSettings(cfg=1.3, steps=5, seed=11, max_frames=12)
    reference = resident_reference(mid_dir, voices, settings)
    plan = OffloadPlan(2, "bf16-packed", prefetch_depth=3, compute_buffers=compute_buffers, encoded_residents=encoded)
    streamed, stats = run_engine(mid_dir, voices, settings, plan)
    assert streamed.stats["decoder_layer_graphs"] > 0 and streamed.stats["speech_graph"]
    assert torch.equal(reference.waveform, streamed.waveform), (reference.waveform - streamed.waveform).abs().max()
    native = load(mid_dir).model.model.language_model.layers[0]
    native_bytes = sum(t.numel() * t.element_size() for t in native.parameters())
    per_copy = stats["offload_bytes_streamed"] / stats["offload_copies"]
    print(f"bf16-packed ({compute_buffers} compute buffers): {per_copy / native_bytes:.3f} of the bf16 layer per copy; stats {stats}")
    assert per_copy < 0.8 * native_bytes


def test_fused_packed_decoding_matches_the_reference_at_a_real_shape():
    """The Triton decoder against the torch reference and the original bits, for a Large MLP
    weight (68 M elements, its natural exceptions, a zero row, an outlier and a NaN)."""
    from vibevoice_offload.bf16_packing import pack_bf16
    from vibevoice_offload.offload.dequant import PackedOp, _packed_kernel, dequantise

    if _packed_kernel(torch.device("cuda")) is None:
        pytest.fail("no Triton bf16-packed decoder on this GPU: Triton missing or it failed its self-check (see the log)")
    weight = (torch.randn(18944, 3584, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    weight[5] = 0.0
    weight[7, 3], weight[9, 9] = 60.0, float("nan")
    packed = pack_bf16(weight)
    assert (packed.exception_positions != 0).sum() > 100  # the patch kernel has real work
    on_gpu = type(packed)(*(t.cuda() for t in packed))
    fused = torch.full(weight.shape, 7.0, dtype=torch.bfloat16, device="cuda")
    reference = torch.full_like(fused, 7.0)
    dequantise([PackedOp(fused, on_gpu)])
    dequantise([PackedOp(reference, on_gpu)], fused_kernel=False)
    assert torch.equal(fused.view(torch.int16), reference.view(torch.int16))
    assert torch.equal(fused.view(torch.int16).cpu(), weight.view(torch.int16))


def _capture_run(model, tokenizer, executor, voices, settings):
    return first_outputs(FrameLoop(model, executor), build_prompt(tokenizer, model.config, SCRIPT, voices), settings)


@pytest.fixture(scope="module")
def fp8_errors(mid_dir, voices):
    """Relative error of the prefill hidden states and the first latent with 6 of the 8
    layers streamed in fp8, against the resident bf16 model (same seed), and the run's stats."""
    settings = GenerationSettings(cfg=1.3, steps=5, seed=5, max_frames=3)
    vv = load(mid_dir)
    vv.model.to("cuda")
    ref = _capture_run(vv.model, vv.tokenizer, ResidentExecutor(vv.model), voices, settings)
    del vv
    vv = load(mid_dir)
    engine = OffloadEngine(vv.model, OffloadPlan(2, "fp8", prefetch_depth=4), "cuda")
    got = _capture_run(vv.model, vv.tokenizer, engine, voices, settings)
    stats = engine.stats()
    native_bytes = engine.native.nbytes
    engine.close()
    errors = {key: relative_error(got[key], ref[key]) for key in ("prefill", "latent")}
    print(f"fp8 relative error: prefill hidden {errors['prefill']:.4f}, first latent {errors['latent']:.4f}; stats {stats}")
    return errors, stats, native_bytes


@pytest.mark.xfail(strict=True, reason=(
    "issue 3's target, NOT MET: 7.6% / 8.5% measured (6 of 8 layers in fp8). e4m3 keeps 3 mantissa bits: one "
    "quantised matrix rounds its product by 2.6% with any row scale, and six layers' errors compound "
    "(bench/fp8_error.py: 1.5-2.0% with one fp8 layer, 5.2-9.9% with six, for every kind of random weights)"))
def test_fp8_streaming_error_meets_the_2_percent_target(fp8_errors):
    errors, _, _ = fp8_errors
    assert errors["prefill"] <= 0.02 and errors["latent"] <= 0.02


def test_fp8_streaming_error_stays_at_its_measured_level(fp8_errors):
    """A regression guard at the level measured so far (7.6% / 8.5%; the 2% target above is
    missed by the format, not by the engine: the CPU test `test_fp8_stream_equals_fp8_rounded_weights`
    shows it adds nothing beyond the rounding). An engine fault, such as a slot overwritten
    before its layer ran, gives errors of order one."""
    errors, stats, native_bytes = fp8_errors
    assert errors["prefill"] <= 0.12 and errors["latent"] <= 0.12
    # fp8 slabs: about half the bf16 bytes per streamed layer
    assert stats["offload_bytes_streamed"] / stats["offload_copies"] < 0.6 * native_bytes


@pytest.mark.parametrize("stream_dtype,compute_buffers,encoded", [
    ("fp8", 2, False), ("fp8", 1, False), ("bf16-packed", 1, False), ("bf16-packed", 2, True), ("bf16-packed", 1, True),
])
def test_no_device_allocation_in_steady_state(mid_dir, voices, stream_dtype, compute_buffers, encoded):
    vv = load(mid_dir)
    plan = OffloadPlan(2 if encoded else 1, stream_dtype, prefetch_depth=5, compute_buffers=compute_buffers, encoded_residents=encoded)
    engine = OffloadEngine(vv.model, plan, "cuda")
    engine.load()
    prompt = build_prompt(vv.tokenizer, vv.model.config, SCRIPT, voices)
    keys = ("segment.all.allocated", "num_alloc_retries", "num_device_alloc")
    marks: dict[int, dict[str, int]] = {}

    def on_frame(i, cap, chunk):
        if i in (6, 40):
            stats = torch.cuda.memory_stats()
            marks[i] = {k: stats.get(k, 0) for k in keys}
            marks[i]["reserved"] = torch.cuda.memory_reserved()

    FrameLoop(vv.model, engine).run(prompt, GenerationSettings(cfg=1.3, steps=5, seed=1, max_frames=45), on_frame)
    engine.close()
    print("memory stats at frames 6 and 40:", marks)
    assert marks[6] == marks[40]


def test_decoding_on_use_writes_the_same_bits(mid_dir, voices):
    """fp8 decoded on use (each weight just before its matmul, into one weight-sized buffer:
    the smallest ring) writes the same bits as decoded a layer ahead into two compute
    buffers, while the previous layer computes, every graph on."""
    settings = GenerationSettings(cfg=1.3, steps=3, seed=4, max_frames=12)
    runs = {
        buffers: run_engine(mid_dir, voices, settings, OffloadPlan(2, "fp8", prefetch_depth=3, compute_buffers=buffers))[0]
        for buffers in (2, 1)
    }
    assert runs[1].stats["decoder_layer_graphs"] > 0 and runs[1].stats["speech_graph"]
    assert runs[1].waveform.numel() > 0 and torch.equal(runs[1].waveform, runs[2].waveform)


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_teardown_leaves_nothing_behind(mid_dir, voices):
    vv = load(mid_dir)
    engine = OffloadEngine(vv.model, OffloadPlan(4, "bf16"), "cuda")
    settings = GenerationSettings(cfg=1.3, steps=2, seed=2, max_frames=3)
    gc.collect()
    torch.cuda.empty_cache()
    base_alloc = torch.cuda.memory_allocated()
    allocs, reserved, rss = [], [], []
    for cycle in range(20):
        engine.load()
        assert engine.loaded and engine.resident_bytes > 0
        vv.generate(SCRIPT, voices, settings, executor=engine)
        engine.unload()
        assert not engine.loaded
        gc.collect()
        allocs.append(torch.cuda.memory_allocated())
        reserved.append(torch.cuda.memory_reserved())
        rss.append(_rss())
    print("allocated", allocs[:3], allocs[-3:], "reserved", reserved[:3], reserved[-3:], "rss MB", [r >> 20 for r in rss[:3]], [r >> 20 for r in rss[-3:]])
    assert allocs[-1] <= base_alloc + 1024
    assert reserved[-1] <= reserved[1]
    assert rss[-1] - rss[2] < 64 * 2**20
    engine.close()
    gc.collect()
    assert torch.cuda.memory_allocated() <= base_alloc + 1024


def test_pinning_disabled_falls_back_and_stays_exact(mid_dir, voices, caplog):
    settings = GenerationSettings(cfg=1.3, steps=3, seed=4, max_frames=5)
    pinned, _ = run_engine(mid_dir, voices, settings, OffloadPlan(2, "bf16"))
    with caplog.at_level("WARNING"):
        pageable, stats = run_engine(mid_dir, voices, settings, OffloadPlan(2, "bf16", pinned=False))
    assert not stats["offload_pinned"]
    assert "pageable" in caplog.text
    assert torch.equal(pinned.waveform, pageable.waveform)


@pytest.mark.parametrize("stream_dtype", ["bf16", "fp8"])
def test_set_resident_layers_between_runs_on_gpu(mid_dir, voices, stream_dtype):
    """Fewer layers resident, then all again: bf16 is exact throughout; fp8 layers made resident
    again are read from the checkpoint (the ring may still be prefetching from the fp8 slabs
    they replace), so the all-resident runs agree bit for bit."""
    settings = GenerationSettings(cfg=1.3, steps=3, seed=9, max_frames=5)
    vv = load(mid_dir)
    engine = OffloadEngine(vv.model, OffloadPlan(LAYERS, stream_dtype), "cuda", layer_source=vv.checkpoint.read_decoder_layer)
    engine.load()
    first = vv.generate(SCRIPT, voices, settings, executor=engine).waveform
    full_bytes = engine.resident_bytes
    engine.set_resident_layers(1)
    fewer = engine.resident_bytes
    second = vv.generate(SCRIPT, voices, settings, executor=engine).waveform
    engine.set_resident_layers(LAYERS)
    third = vv.generate(SCRIPT, voices, settings, executor=engine).waveform
    engine.close()
    assert fewer < full_bytes
    assert torch.equal(first, third)
    assert torch.equal(first, second) == (stream_dtype == "bf16")


def test_refused_pinning_falls_back_and_cuda_keeps_working(mid_dir, voices, monkeypatch, caplog):
    """A real refusal by cudaHostRegister (the same pages registered twice) leaves the CUDA
    runtime's last error set, which PyTorch's next kernel launch would raise: the engine
    falls back to pageable slabs, warns, and the run is exact."""
    from vibevoice_offload.offload import host_slabs

    settings = GenerationSettings(cfg=1.3, steps=3, seed=4, max_frames=5)
    pinned, _ = run_engine(mid_dir, voices, settings, OffloadPlan(2, "bf16"))
    register = host_slabs._cuda_host_register
    refusals = []

    def registered_twice(tensor):
        assert register(tensor) is None
        try:
            refusal = register(tensor)  # refused by CUDA: the pages are registered already
            refusals.append(refusal)
            return refusal
        finally:
            host_slabs._cuda_host_unregister(tensor.data_ptr())

    monkeypatch.setattr(host_slabs, "_cuda_host_register", registered_twice)
    with caplog.at_level("WARNING"):
        pageable, stats = run_engine(mid_dir, voices, settings, OffloadPlan(2, "bf16"))
    assert refusals and all(r and "cudaHostRegister returned error" in r for r in refusals), refusals
    assert not stats["offload_pinned"] and "falling back to pageable memory" in caplog.text
    assert torch.equal(pinned.waveform, pageable.waveform)


@pytest.mark.parametrize("failing_call", [1, 2], ids=["load", "frame-extension"])
def test_out_of_memory_while_placing_gives_the_vram_back(mid_dir, voices, failing_call):
    """Out of memory in load() after the resident parts went to the device, or while the frame
    extension moves layers: the VRAM comes back at once, with no unload() (ComfyUI, catching
    the error, counts nothing loaded), and the next run is exact."""
    settings = GenerationSettings(cfg=1.3, steps=3, seed=4, max_frames=5)
    plan = OffloadPlan(2, "bf16", prefetch_depth=2, frame_layers=2, frame_slots=1)
    reference, _ = run_engine(mid_dir, voices, settings, plan)
    vv = load(mid_dir)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    engine = OffloadEngine(vv.model, plan, "cuda")
    calls = out_of_memory_on_call(engine, failing_call)
    with pytest.raises(torch.OutOfMemoryError):
        vv.generate(SCRIPT, voices, settings, executor=engine)
    assert calls == list(range(1, failing_call + 1)) and not engine.loaded
    gc.collect()
    assert torch.cuda.memory_allocated() == base, torch.cuda.memory_allocated() - base
    again = vv.generate(SCRIPT, voices, settings, executor=engine).waveform
    engine.close()
    assert torch.equal(again, reference.waveform)


def test_fused_dequantisation_matches_torch_kernels(mid_dir):
    """The fused Triton kernel (where it is available) writes the same bits as torch's
    copy_/mul_ for every tensor of a real layer's fp8 slab."""
    from vibevoice_offload.offload.dequant import _fp8_kernel, dequant_ops, dequantise
    from vibevoice_offload.offload.host_slabs import FP8, NATIVE, SlabLayout, pack_layer

    vv = load(mid_dir)
    layer = vv.model.model.language_model.layers[0]
    native, fp8 = SlabLayout.build(layer, NATIVE), SlabLayout.build(layer, FP8)
    host = pack_layer(layer, fp8, pinned=True)
    staging = torch.empty(fp8.nbytes, dtype=torch.uint8, device="cuda")
    staging[: host.nbytes].copy_(host.slab)
    out = torch.full((native.nbytes,), 7, dtype=torch.uint8, device="cuda")
    ops = dequant_ops(native, fp8, out, staging)
    dequantise(ops, fused_kernel=False)
    expected = out.clone()
    out.fill_(7)
    dequantise(ops)
    if _fp8_kernel(out.device) is None:
        pytest.skip("no fused kernel on this machine (Triton missing or failed its self-check)")
    assert torch.equal(out, expected)


@pytest.mark.parametrize("cfg", [1.0, 1.3])
def test_cuda_graph_replay_equals_eager(mid_dir, voices, cfg):
    """The speech half of each frame replayed from a CUDA graph writes the same audio as
    running it eagerly, frame for frame, with the tokenizers reset mid-run."""
    from vibevoice_offload.speech_frame import SpeechFrame

    vv = load(mid_dir)
    vv.model.to("cuda")
    config, cuda = vv.model.config, torch.device("cuda")
    g = torch.Generator().manual_seed(8)
    inputs = [
        (torch.randn(2, config.audio_config.hidden_size, generator=g), *(torch.randn(1, config.text_config.hidden_size, generator=g).to(cuda, torch.bfloat16) for _ in range(2)))
        for _ in range(6)
    ]
    outputs = {}
    with torch.inference_mode():
        for graph in (False, True):
            graphs = GraphPool(cuda) if graph else None
            frame = SpeechFrame(vv.model, cuda, torch.bfloat16, steps=5, cfg=cfg, graphs=graphs)
            seen = []
            for i, (noise, positive, negative) in enumerate(inputs):
                if i == 4:
                    frame.reset_tokenizers()
                audio, embeds = frame(noise, positive, negative if cfg != 1.0 else None)
                seen.append((audio.float().cpu(), embeds.float().cpu()))
            assert frame.captured == graph
            frame.release()
            if graphs is not None:
                graphs.release()
            outputs[graph] = seen
    for (a_eager, e_eager), (a_graph, e_graph) in zip(outputs[False], outputs[True]):
        assert torch.equal(a_eager, a_graph)
        assert torch.equal(e_eager, e_graph)
    prompt_run = FrameLoop(vv.model, ResidentExecutor(vv.model)).run(
        build_prompt(vv.tokenizer, config, SCRIPT, voices), GenerationSettings(cfg=cfg, steps=3, seed=1, max_frames=4))
    assert prompt_run.stats["speech_graph"] is True


@pytest.mark.parametrize("plan", [
    OffloadPlan(LAYERS, "bf16"), OffloadPlan(3, "bf16", prefetch_depth=2), OffloadPlan(3, "fp8", prefetch_depth=2),
    OffloadPlan(3, "fp8", prefetch_depth=2, compute_buffers=1), OffloadPlan(3, "bf16-packed", prefetch_depth=2, compute_buffers=1),
])
def test_decoder_graphs_equal_eager_layers(mid_dir, voices, plan):
    """Whole runs with both halves of each frame (and fp8 dequantisation) replayed from CUDA
    graphs write the same bits as eager runs: resident, and streamed through two slots (5
    streamed layers: a layer's slot changes from frame to frame, so it is captured once per
    slot it runs from)."""
    settings = GenerationSettings(cfg=1.3, steps=3, seed=5, max_frames=8)
    vv = load(mid_dir)
    engine = OffloadEngine(vv.model, plan, "cuda")
    engine.load()
    prompt = build_prompt(vv.tokenizer, vv.model.config, SCRIPT, voices)
    runs = {}
    for graph in (False, True):
        if engine._ring is not None:  # fp8: the ring's dequantisation graphs too (they outlive runs)
            engine._ring._capture = graph
        runs[graph] = FrameLoop(vv.model, engine, cuda_graph=graph).run(prompt, settings)
    dequant_graphs = len(engine._ring._dequant_graphs) if engine._ring is not None else 0
    engine.close()
    # Decoded ahead, copies and dequantisations run in one order, so with two staging slots
    # and two compute buffers slot i always feeds buffer i: two (buffer, slot) pairs, each
    # captured. Decoded on use, the decoding is in the layers' graphs.
    decodes_ahead = plan.staged and plan.compute_buffers == 2
    assert dequant_graphs == (2 if decodes_ahead else 0)
    assert runs[True].stats["speech_graph"] and not runs[False].stats["speech_graph"]
    streamed = LAYERS - plan.resident_layers
    # a streamed layer runs from the slot (or compute buffer) its turn gives it: with two it
    # alternates (5 streamed layers)
    modules = (plan.compute_buffers if decodes_ahead else plan.prefetch_depth) if streamed else 1
    assert runs[True].stats["decoder_layer_graphs"] >= LAYERS + streamed * (min(modules, 2) - 1)
    assert runs[False].stats["decoder_layer_graphs"] == 0
    assert torch.equal(runs[True].waveform, runs[False].waveform)


def test_reserved_memory_returns_after_each_run(mid_dir, voices):
    """Each run's graphs live in a pool of its own that the run frees: with the model kept
    loaded, reserved VRAM does not creep from run to run."""
    vv = load(mid_dir)
    engine = OffloadEngine(vv.model, OffloadPlan(3, "bf16"), "cuda")
    engine.load()
    prompt = build_prompt(vv.tokenizer, vv.model.config, SCRIPT, voices)
    reserved = []
    for seed in range(5):
        result = FrameLoop(vv.model, engine).run(prompt, GenerationSettings(cfg=1.3, steps=3, seed=seed, max_frames=6))
        assert result.stats["speech_graph"]
        reserved.append(torch.cuda.memory_reserved())
    engine.close()
    print("reserved after each run (MiB):", [r >> 20 for r in reserved])
    assert reserved[-1] <= reserved[1]


@pytest.mark.parametrize("stream_dtype,encoded", [("bf16", False), ("fp8", False), ("bf16-packed", False), ("bf16-packed", True)])
def test_frame_extension_on_gpu(mid_dir, voices, stream_dtype, encoded):
    """Frames with 3 more resident layers and a deeper ring (all graphs on) write the same
    bits as the plan without them; the extension is on the device during the frames only:
    allocated memory is back to its level once the run ends."""
    settings = GenerationSettings(cfg=1.3, steps=3, seed=6, max_frames=10)
    vv = load(mid_dir)
    prompt = build_prompt(vv.tokenizer, vv.model.config, SCRIPT, voices)
    runs = {}
    plain_plan = OffloadPlan(1, stream_dtype, 2, encoded_residents=encoded)
    for plan in (plain_plan, dataclasses.replace(plain_plan, frame_layers=3, frame_slots=2)):
        engine = OffloadEngine(vv.model, plan, "cuda")
        engine.load()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        during = []

        def on_frame(i, cap, chunk):
            during.append(torch.cuda.memory_allocated() - before)

        result = FrameLoop(vv.model, engine).run(prompt, settings, on_frame)
        torch.cuda.synchronize()
        runs[plan.frame_layers] = (result, engine.stats(), during, torch.cuda.memory_allocated() - before)
        layer_bytes = engine.stream_layout.nbytes if encoded else engine.native.nbytes
        engine.close()
        del engine
        gc.collect()
    (plain, _, plain_during, plain_left), (ext, stats, ext_during, ext_left) = runs[0], runs[3]
    assert plain.waveform.numel() > 0 and torch.equal(plain.waveform, ext.waveform)
    assert ext.stats["decoder_layer_graphs"] > 0 and ext.stats["speech_graph"]
    assert stats["offload_frame_resident_layers"] == 4 and stats["offload_resident_layers"] == 1
    # (a plain staged ring keeps its decoding graphs' pool across runs; the extended run's
    # end rebuilds the ring, so nothing of the frames is left)
    assert ext_left == 0 and (plain_left == 0 or stream_dtype != "bf16"), (plain_left, ext_left)
    # during the frames the 3 layers (and the deeper ring) are on the device beyond the plain run's use
    extra = min(ext_during) - max(plain_during)
    print(f"frame extension ({stream_dtype}): {extra >> 20} MiB over the plain run during frames; 3 layers {3 * layer_bytes >> 20} MiB")
    assert extra >= 3 * layer_bytes
