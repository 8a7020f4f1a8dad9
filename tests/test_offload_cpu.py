"""The layer offloader's bookkeeping on the CPU (no streams): same engine code, synchronous copies."""

from __future__ import annotations

import gc
import os
from unittest import mock

import pytest
import torch

from vibevoice_offload.bf16_packing import PackingError
from vibevoice_offload.executor import ResidentExecutor
from vibevoice_offload.frame_loop import GenerationSettings
from vibevoice_offload.offload import OffloadEngine, SlabLayout
from vibevoice_offload.offload.gpu_slots import DecodedLinear, make_shell, weight_buffer_nbytes
from vibevoice_offload.offload import engine as engine_module
from vibevoice_offload.offload import host_slabs
from vibevoice_offload.offload.host_slabs import ALIGN, FP8, NATIVE, PACKED
from vibevoice_offload.pipeline import VibeVoice
from vibevoice_offload.plan import OffloadPlan

from faults import out_of_memory_on_call

SCRIPT = "Speaker 1: Hello there.\nSpeaker 2: Hi!"
SETTINGS = GenerationSettings(cfg=1.3, steps=3, seed=7, max_frames=6)
LAYERS = 4  # the tiny synthetic model


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    g = torch.Generator().manual_seed(1)
    voices = {1: (torch.randn(1, 40, generator=g) * 0.1, 24000), 2: (torch.randn(2, 30, generator=g) * 0.1, 16000)}
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    return voices, vv.generate(SCRIPT, voices, SETTINGS, executor=ResidentExecutor(vv.model))


@pytest.fixture(scope="module")
def reference_bf16(tiny_model_dir, reference):
    """The resident bf16 model's audio (bf16-packed streaming must give exactly this)."""
    voices, _ = reference
    vv = VibeVoice.load(tiny_model_dir, dtype="bf16")
    return vv.generate(SCRIPT, voices, SETTINGS, executor=ResidentExecutor(vv.model)).waveform


def decoded_into(engine: OffloadEngine, compute_buffers: int) -> int:
    """The ring's model-dtype bytes that staged layers are decoded into: two layers ahead, or
    on use the largest weight."""
    return 2 * engine.native.nbytes if compute_buffers == 2 else weight_buffer_nbytes(engine.native, engine.stream_layout)


def engine_for(tiny_model_dir, plan, dtype=None):
    """An engine on the CPU; the model in fp32, or bf16 where the plan packs bf16."""
    vv = VibeVoice.load(tiny_model_dir, dtype=dtype or ("bf16" if plan.stream_dtype == PACKED else "fp32"))
    return vv, OffloadEngine(vv.model, plan, "cpu")


# --- plan validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("plan", [
    OffloadPlan(5, "bf16"), OffloadPlan(-1, "bf16"), OffloadPlan(2, "int4"), OffloadPlan(2, "bf16", prefetch_depth=1),
    OffloadPlan(2, "bf16", frame_layers=3), OffloadPlan(2, "bf16", frame_slots=-1), OffloadPlan(2, "bf16", frame_layers=True),
])
def test_engine_refuses_invalid_plans(tiny_model_dir, plan):
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    with pytest.raises(ValueError):
        OffloadEngine(vv.model, plan, "cpu")


# --- layouts ----------------------------------------------------------------------------------------

def test_layouts_are_aligned_exact_and_fp8_halves_the_linears(tiny_model_dir):
    vv = VibeVoice.load(tiny_model_dir, dtype="bf16")
    layer = vv.model.model.language_model.layers[0]
    native, fp8 = SlabLayout.build(layer, NATIVE), SlabLayout.build(layer, FP8)
    tensors = dict(layer.named_parameters())
    assert {e.name for e in native.entries} == set(tensors)
    assert all(e.offset % ALIGN == 0 for e in native.entries + fp8.entries)
    assert native.nbytes >= sum(t.numel() * t.element_size() for t in tensors.values())
    assert native.nbytes - sum(t.numel() * t.element_size() for t in tensors.values()) < ALIGN * len(tensors)
    q = [e for e in fp8.entries if e.role == "q"]
    assert {e.name for e in q} == {n for n in tensors if n.endswith("proj.weight")}
    assert all(e.dtype == torch.float8_e4m3fn for e in q)
    assert all(native.matches(l) for l in vv.model.model.language_model.layers)


def test_packed_layout_codes_the_linears_in_three_quarters(tiny_model_dir):
    vv = VibeVoice.load(tiny_model_dir, dtype="bf16")
    layer = vv.model.model.language_model.layers[0]
    packed = SlabLayout.build(layer, PACKED)
    q = {e.name: e for e in packed.entries if e.role == "q"}
    assert set(q) == {n for n, _ in layer.named_parameters() if n.endswith("proj.weight")}
    for name, entry in q.items():
        weight = layer.get_parameter(name)
        assert entry.dtype == torch.uint8 and entry.shape == tuple(weight.shape)  # one low byte per element
        parts = [e for e in packed.entries if e.name.startswith(name + ".__")]
        assert [e.name.rsplit("__", 1)[1] for e in parts] == ["codes", "base", "exception_positions", "exception_bytes"]
        assert parts[0].nbytes == (weight.numel() + 1) // 2
    assert all(e.offset % ALIGN == 0 for e in packed.entries)


def test_packed_streaming_needs_a_bf16_model(tiny_model_dir):
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    with pytest.raises(ValueError, match="bf16-packed streaming needs a bf16 model; self_attn.q_proj.weight is torch.float32"):
        OffloadEngine(vv.model, OffloadPlan(1, "bf16-packed"), "cpu")


def test_make_shell_copies_structure_not_data(tiny_model_dir):
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    layer = vv.model.model.language_model.layers[0]
    shell = make_shell(layer)
    assert all(p.is_meta for p in shell.parameters())
    assert [n for n, _ in shell.named_parameters()] == [n for n, _ in layer.named_parameters()]
    assert not any(p.is_meta for p in layer.parameters())


# --- exactness ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("resident,depth", [(LAYERS, 2), (2, 2), (1, 2), (0, 2), (0, 3), (1, 4)])
def test_engine_output_equals_resident_executor(tiny_model_dir, reference, resident, depth):
    voices, ref = reference
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(resident, "bf16", prefetch_depth=depth))
    out = vv.generate(SCRIPT, voices, SETTINGS, executor=engine)
    assert torch.equal(out.waveform, ref.waveform)
    stats = engine.stats()
    assert stats["offload_streamed_layers"] == LAYERS - resident
    if resident < LAYERS:
        # each pass streams every streamed layer once; the ring runs ahead by at most its depth
        assert stats["offload_passes"] == SETTINGS.max_frames
        lo = stats["offload_passes"] * (LAYERS - resident)
        assert lo <= stats["offload_copies"] <= lo + min(depth, LAYERS - resident)
    engine.close()


def test_fp8_streaming_runs_and_copies_fewer_bytes_than_the_layer(tiny_model_dir, reference):
    voices, ref = reference
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(2, "fp8"))
    out = vv.generate(SCRIPT, voices, SETTINGS, executor=engine)
    stats = engine.stats()
    assert out.waveform.shape == ref.waveform.shape and torch.isfinite(out.waveform).all()
    assert stats["offload_bytes_streamed"] / stats["offload_copies"] < engine.native.nbytes
    engine.close()


@pytest.mark.parametrize("compute_buffers", [2, 1])
def test_fp8_stream_equals_fp8_rounded_weights(tiny_model_dir, reference, compute_buffers):
    """fp8 streaming adds no error beyond the rounding: the same audio as a resident model whose
    streamed layers' linear weights were quantised and dequantised (row scales, float32).
    Decoded a layer ahead into two compute buffers, or on use into one weight-sized buffer."""
    from vibevoice_offload.fp8 import quantize_fp8

    voices, _ = reference
    plan = OffloadPlan(2, "fp8", prefetch_depth=3, compute_buffers=compute_buffers)
    vv, engine = engine_for(tiny_model_dir, plan)
    streamed = vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform
    assert engine.slot_bytes == decoded_into(engine, compute_buffers) + 2 * engine.stream_layout.nbytes
    engine.close()
    rounded = VibeVoice.load(tiny_model_dir, dtype="fp32")
    with torch.no_grad():
        for layer in (rounded.model.model.language_model.layers[i] for i in plan.streamed_indices(LAYERS)):
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    q, scale = quantize_fp8(module.weight)
                    module.weight.copy_(q.to(torch.float32) * scale[:, None])
    expected = rounded.generate(SCRIPT, voices, SETTINGS, executor=ResidentExecutor(rounded.model)).waveform
    assert torch.equal(streamed, expected)


@pytest.mark.parametrize("stream_dtype,encoded", [("fp8", False), ("bf16-packed", False), ("bf16-packed", True)])
def test_decoding_on_use_shares_one_weight_sized_buffer(tiny_model_dir, stream_dtype, encoded):
    """Decoded on use, each slot's module (the rotating slots' and the encoded residents'
    fixed ones) runs every linear layer from one buffer the size of the layer's largest
    weight, shared by all slots, and its norms and biases from its own slot: the ring is
    its staging slots and that one weight, not a layer."""
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(1, stream_dtype, prefetch_depth=2, compute_buffers=1, encoded_residents=encoded))
    engine.load()
    ring = engine._ring
    template = vv.model.model.language_model.layers[0]
    largest = max(m.weight.numel() for m in template.modules() if isinstance(m, torch.nn.Linear))
    assert ring.weight_buffer.numel() == largest * vv.model.dtype.itemsize and not ring.computes
    assert engine.slot_bytes == 2 * engine.stream_layout.nbytes + ring.weight_buffer.numel()
    slots = [*ring.slots, *ring.fixed.values()]
    assert len(slots) == 2 + encoded
    for slot in slots:
        linears = [m for m in slot.module.modules() if isinstance(m, DecodedLinear)]
        assert len(linears) == sum(isinstance(m, torch.nn.Linear) for m in template.modules()) > 0
        assert all(m.weight.data_ptr() == ring.weight_buffer.data_ptr() for m in linears)
        start, end = slot.buffer.data_ptr(), slot.buffer.data_ptr() + slot.buffer.numel()
        own = [t for t in slot.module.parameters()] + [m.bias for m in linears if m.bias is not None]
        assert own and all(start <= t.data_ptr() < end for t in own)  # norms and biases: views into the slot
    engine.close()


@pytest.mark.parametrize("resident,depth,compute_buffers,encoded", [
    (2, 2, 2, False), (0, 3, 1, False), (1, 2, 1, False), (LAYERS, 2, 2, False),
    (2, 2, 2, True), (1, 2, 1, True), (LAYERS, 2, 1, True), (LAYERS, 2, 2, True),
])
def test_packed_streaming_is_bit_identical_to_resident(tiny_model_dir, reference, reference_bf16, resident, depth, compute_buffers, encoded):
    """The 12-bit format loses nothing: the same audio as the resident bf16 model, with the
    layers decoded into one or two compute buffers, resident layers too when they are kept
    encoded. (At these tiny shapes the packed slab is not smaller: each part is aligned to
    256 bytes; test_planner checks the real shapes.)"""
    voices, _ = reference
    plan = OffloadPlan(resident, "bf16-packed", prefetch_depth=depth, compute_buffers=compute_buffers, encoded_residents=encoded)
    vv, engine = engine_for(tiny_model_dir, plan)
    out = vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform
    stats = engine.stats()
    assert torch.equal(out, reference_bf16)
    if resident < LAYERS or encoded:
        assert engine.slot_bytes == decoded_into(engine, compute_buffers) + min(depth, LAYERS - resident) * engine.stream_layout.nbytes
        assert stats["offload_bytes_streamed"] == stats["offload_copies"] * engine.stream_layout.nbytes
        assert stats["offload_copies"] == stats["offload_passes"] * (LAYERS - resident) + min(depth, LAYERS - resident)
    layers = vv.model.model.language_model.layers
    if resident < LAYERS:
        assert layers[LAYERS - 1].mlp.up_proj.weight.is_meta  # the packed slab is the only host copy
    engine.close()
    # closing decodes the slabs: the model holds its own weights again, bit for bit
    again = vv.generate(SCRIPT, voices, SETTINGS, executor=ResidentExecutor(vv.model)).waveform
    assert torch.equal(again, reference_bf16)


def test_a_weight_the_packing_cannot_hold_is_named_and_nothing_is_lost(tiny_model_dir, reference, reference_bf16):
    """Weights far outside one scale (here a quarter of layer 2's up_proj) are refused by
    layer and name; the model is untouched, so bf16 streaming then gives the reference audio."""
    voices, _ = reference
    vv = VibeVoice.load(tiny_model_dir, dtype="bf16")
    weight = vv.model.model.language_model.layers[2].mlp.up_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[::4] *= 2.0**40  # its values' high bytes scatter far beyond 14 binades
        weight.view(-1)[1::4] *= 2.0**-40
    changed = weight.detach().clone()
    engine = OffloadEngine(vv.model, OffloadPlan(0, "bf16-packed"), "cpu")  # layers 0 and 1 are packed first
    with pytest.raises(PackingError, match=r"decoder layer 2 mlp\.up_proj\.weight: \d+ of \d+ values .* stream this model as bf16"):
        engine.load()
    engine.close()
    assert torch.equal(vv.model.model.language_model.layers[2].mlp.up_proj.weight, changed)
    with torch.no_grad():
        vv.model.model.language_model.layers[2].mlp.up_proj.weight.copy_(original)
    bf16 = OffloadEngine(vv.model, OffloadPlan(1, "bf16"), "cpu")
    assert torch.equal(vv.generate(SCRIPT, voices, SETTINGS, executor=bf16).waveform, reference_bf16)
    bf16.close()


# --- the ring ----------------------------------------------------------------------------------------

def _trace(engine):
    """Record (layer, slot) of every copy the engine issues."""
    issued = []
    original = engine._issue_copy

    def issue(layer):
        original(layer)
        use = engine._queue[-1]
        issued.append((use.layer, use.slot.index))

    engine._issue_copy = issue
    return issued


@pytest.mark.parametrize("resident,depth", [(1, 2), (0, 3), (2, 2), (0, 2)])
def test_prefetch_runs_cyclically_across_passes_and_slots_rotate(tiny_model_dir, reference, resident, depth):
    voices, _ = reference
    plan = OffloadPlan(resident, "bf16", prefetch_depth=depth)
    vv, engine = engine_for(tiny_model_dir, plan)
    issued = _trace(engine)
    engine.load()  # primes the ring: the first `depth` streamed layers
    vv.generate(SCRIPT, voices, SETTINGS, executor=engine)
    streamed = list(plan.streamed_indices(LAYERS))
    depth = min(depth, len(streamed))
    # the copy order is the streamed layers cyclically, wrapping from one pass into the next
    assert [layer for layer, _ in issued] == [streamed[c % len(streamed)] for c in range(len(issued))]
    # slots are reused round-robin: copy c goes to slot c % depth
    assert [slot for _, slot in issued] == [c % depth for c in range(len(issued))]
    # the last pass already issued the first layers of a pass that never came: prefetch across frames
    assert len(issued) == SETTINGS.max_frames * len(streamed) + depth
    engine.close()


def test_an_aborted_pass_resyncs_the_ring(tiny_model_dir, reference):
    voices, ref = reference
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(0, "bf16"))
    engine.load()
    engine.decoder_layer(0)
    engine.decoder_layer_done(0)
    engine.decoder_layer(1)  # pass abandoned mid-way (an exception, a cancel)
    out = vv.generate(SCRIPT, voices, SETTINGS, executor=engine)
    assert torch.equal(out.waveform, ref.waveform)
    engine.close()


@pytest.mark.parametrize("resident,depth,compute_buffers", [(2, 2, 1), (1, 3, 2), (3, 2, 2)])
def test_encoded_residents_are_decoded_in_turn_and_never_copied(tiny_model_dir, reference, reference_bf16, resident, depth, compute_buffers):
    """Encoded residents: every layer runs from the ring (decoded) in order each pass, each
    resident from its own fixed slot; the copies are the streamed layers' only, cyclic, into
    the rotating slots; a resident layer costs its packed bytes on the device."""
    voices, _ = reference
    plan = OffloadPlan(resident, "bf16-packed", depth, compute_buffers=compute_buffers, encoded_residents=True)
    vv, engine = engine_for(tiny_model_dir, plan)
    issued = _trace(engine)
    decoded = []
    original = engine.decoder_layer

    def decoder_layer(index):
        module = original(index)
        use = engine._queue[0]
        decoded.append((use.layer, use.slot.index, use.copied))
        return module

    engine.decoder_layer = decoder_layer
    engine.load()
    assert torch.equal(vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform, reference_bf16)
    streamed = list(plan.streamed_indices(LAYERS))
    slots = min(depth, len(streamed))
    assert [layer for layer, _ in issued] == [streamed[c % len(streamed)] for c in range(len(issued))]
    assert [slot for _, slot in issued] == [c % slots for c in range(len(issued))]
    assert [layer for layer, _, _ in decoded] == [c % LAYERS for c in range(len(decoded))]
    fixed = {layer: slot for layer, slot, copied in decoded if not copied}
    assert sorted(fixed) == sorted(plan.resident_indices(LAYERS)) and sorted(set(fixed.values())) == list(range(slots, slots + resident))
    _, streaming_all = engine_for(tiny_model_dir, OffloadPlan(0, "bf16-packed", depth, compute_buffers=compute_buffers, encoded_residents=True))
    streaming_all.load()
    ring_change = engine.slot_bytes - streaming_all.slot_bytes  # fewer staging slots when few layers stream
    assert engine.resident_bytes - streaming_all.resident_bytes == resident * engine.stream_layout.nbytes + ring_change
    engine.close(), streaming_all.close()


def test_set_plan_switches_between_decoded_and_encoded_residents(tiny_model_dir, reference, reference_bf16):
    """set_plan (between loads, as the benchmark and ComfyUI use it) may keep the residents
    packed or decoded: slabs are re-packed where needed, and every run gives the same bits."""
    voices, _ = reference
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(2, "bf16-packed"))
    plans = [OffloadPlan(3, "bf16-packed", encoded_residents=True), OffloadPlan(1, "bf16-packed"), OffloadPlan(LAYERS, "bf16-packed", encoded_residents=True)]
    outs = [vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform]
    for plan in plans:
        engine.unload()
        engine.set_plan(plan)
        outs.append(vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform)
        assert engine.resident_bytes == engine.resident_bytes_for(plan.resident_layers)
    assert all(torch.equal(o, reference_bf16) for o in outs)
    assert all(h.format == PACKED for h in engine._host)
    engine.close()


def test_set_resident_layers_switches_packed_and_decoded_residents_while_loaded(tiny_model_dir, reference, reference_bf16):
    """ComfyUI's path: set_resident_layers(n, encoded_residents) on a loaded engine changes the
    count and the residents' form at once (it reloads), to exactly the bytes
    resident_bytes_for priced, and every run gives the same bits."""
    voices, _ = reference
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(LAYERS, "bf16-packed", encoded_residents=False))
    engine.load()
    for n, encoded in ((2, True), (LAYERS, False), (LAYERS, True), (1, True), (3, False)):
        expected = engine.resident_bytes_for(n, encoded)
        engine.set_resident_layers(n, encoded)
        assert engine.loaded and (engine.resident_layers, engine.plan.encoded_residents) == (n, encoded)
        assert engine.resident_bytes == expected
        assert torch.equal(vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform, reference_bf16)
    engine.close()


def test_encoded_residents_need_bf16_packed(tiny_model_dir):
    vv = VibeVoice.load(tiny_model_dir, dtype="bf16")
    for stream_dtype in ("bf16", "fp8"):
        with pytest.raises(ValueError, match="encoded_residents needs stream_dtype 'bf16-packed'"):
            OffloadEngine(vv.model, OffloadPlan(2, stream_dtype, encoded_residents=True), "cpu")


# --- the frame extension ------------------------------------------------------------------------

@pytest.mark.parametrize("stream_dtype,encoded", [("bf16", False), ("fp8", False), ("bf16-packed", False), ("bf16-packed", True)])
def test_frame_extension_is_exact_and_undone_when_the_run_ends(tiny_model_dir, reference, reference_bf16, stream_dtype, encoded):
    """Frames run with 2 more resident layers and a deeper ring (1 streamed layer, so a ring of
    one slot): the same audio as the plan without the extension, every layer the prompt passes
    stream crosses once per pass, the frames stream only the last layer, and after the run
    the engine holds exactly what it held before. Encoded residents copy the same layers."""
    voices, ref = reference
    base = OffloadPlan(1, stream_dtype, prefetch_depth=2, encoded_residents=encoded)
    vv, engine = engine_for(tiny_model_dir, base)
    without = vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform
    engine.close()
    extended = OffloadPlan(1, stream_dtype, prefetch_depth=2, frame_layers=2, frame_slots=1, encoded_residents=encoded)
    vv, engine = engine_for(tiny_model_dir, extended)
    issued = _trace(engine)
    engine.load()
    before = engine.resident_bytes
    arranged = []
    original = engine.begin_frames

    def begin_frames():
        original()
        arranged.append((engine.resident_bytes, len(engine._cycle), len(engine._ring)))

    engine.begin_frames = begin_frames
    out = vv.generate(SCRIPT, voices, SETTINGS, executor=engine)
    stats = engine.stats()
    assert torch.equal(out.waveform, without)
    if stream_dtype != "fp8":
        assert torch.equal(out.waveform, ref.waveform if stream_dtype == "bf16" else reference_bf16)
    layer = engine.native.nbytes
    resident_layer = engine.stream_layout.nbytes if encoded else layer
    # frames: 2 more layers on the device, the ring shrinks to the one layer left to stream
    slot = layer if stream_dtype == "bf16" else engine.stream_layout.nbytes + decoded_into(engine, 2)  # staged: staging + compute buffers
    streamed = list(base.streamed_indices(LAYERS))  # 3 of the 4 layers; only the last of them in the frames
    cycle = [0, 1, 2, 3] if encoded else streamed  # the layers that run from the ring
    frames_cycle = LAYERS if encoded else 1  # in the frames: every layer, or the one left to stream
    assert arranged == [(before - engine._ring.nbytes + 2 * resident_layer + slot, frames_cycle, 1)]
    assert engine.resident_bytes == before and engine._cycle == cycle and len(engine._ring) == 2
    # the prompt pass (both branches at once) streams the 3 layers with the base ring primed on
    # load and running on into the next pass; the frames' ring of one slot streams the last
    # once per pass (primed, then one copy per pass); the run's end re-primes the base ring
    frame_passes = stats["offload_passes"] - 1
    first_two, last = streamed[:2], streamed[-1]
    assert extended.in_frames().streamed_indices(LAYERS) == (last,)
    assert [layer for layer, _ in issued] == streamed + first_two + [last] * (1 + frame_passes) + first_two
    assert stats["offload_frame_resident_layers"] == 3 and stats["offload_resident_layers"] == 1
    engine.close()


def test_frame_extension_is_undone_when_a_run_fails(tiny_model_dir, reference):
    voices, ref = reference
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(0, "bf16", frame_layers=3, frame_slots=2))
    engine.load()
    before = engine.resident_bytes

    def fail(i, cap, chunk):
        assert engine._arranged.resident_layers == 3  # the frames are under the extension
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        vv.generate(SCRIPT, voices, SETTINGS, executor=engine, on_frame=fail)
    assert engine.resident_bytes == before and engine._arranged == engine.plan
    assert torch.equal(vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform, ref.waveform)
    engine.close()


def test_running_out_of_memory_while_rearranging_leaves_the_engine_unloaded(tiny_model_dir, reference):
    """Out of memory while the frame extension moves layers (half of them moved, no ring):
    the engine unloads (on a GPU its VRAM goes back at once, test_offload_gpu.py; ComfyUI
    then counts nothing loaded), and the next run loads again from the host slabs and is
    exact. (Out of memory in load() itself: the GPU test.)"""
    voices, ref = reference
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(1, "bf16", frame_layers=2, frame_slots=1))
    calls = out_of_memory_on_call(engine, 2)
    with pytest.raises(torch.OutOfMemoryError):
        vv.generate(SCRIPT, voices, SETTINGS, executor=engine)
    assert calls == [1, 2]
    assert not engine.loaded and engine.resident_bytes == 0 and not engine._resident_buffers
    assert not engine._placement.params and not engine._placement.buffers and engine._arranged == engine.plan
    assert torch.equal(vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform, ref.waveform)
    engine.close()


# --- residency and lifecycle ----------------------------------------------------------------------

def test_resident_bytes_accounting(tiny_model_dir):
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(LAYERS, "bf16"))
    assert engine.resident_bytes == 0
    engine.load()
    full = engine.resident_bytes
    per_layer = engine.native.nbytes
    model = vv.model
    non_layer = sum(
        t.numel() * t.element_size()
        for m in (model.model.language_model.norm, model.model.diffusion_head, model.model.audio_tower.decoder,
                  model.model.semantic_tokenizer_encoder, model.model.multi_modal_projector, model.model.semantic_connector,
                  model.model.language_model.embed_tokens, model.model.language_model.rotary_emb)
        for t in (*m.parameters(), *m.buffers())
    ) + 2 * 4
    assert full == non_layer + LAYERS * per_layer
    engine.set_resident_layers(1)
    slots = engine.slot_bytes
    assert slots == 2 * per_layer
    assert engine.resident_bytes == non_layer + 1 * per_layer + slots
    with engine.acoustic_encoder() as encoder:
        enc = sum(t.numel() * t.element_size() for t in (*encoder.parameters(), *encoder.buffers()))
        assert engine.resident_bytes == non_layer + 1 * per_layer + slots + enc
    engine.unload()
    assert engine.resident_bytes == 0
    engine.close()


def test_embed_on_host_is_not_resident(tiny_model_dir):
    _, a = engine_for(tiny_model_dir, OffloadPlan(LAYERS, "bf16"))
    _, b = engine_for(tiny_model_dir, OffloadPlan(LAYERS, "bf16", embed_on_host=True))
    a.load(), b.load()
    embed = a.model.model.language_model.embed_tokens.weight
    assert a.resident_bytes - b.resident_bytes == embed.numel() * embed.element_size()
    a.close(), b.close()


@pytest.mark.parametrize("stream_dtype,encoded", [("bf16", False), ("fp8", False), ("bf16-packed", False), ("bf16-packed", True)])
def test_set_resident_layers_down_and_up(tiny_model_dir, reference, reference_bf16, stream_dtype, encoded):
    voices, ref = reference
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(LAYERS, stream_dtype, encoded_residents=encoded))
    engine.load()
    outs = [vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform]
    for n in (1, 3, 0, LAYERS):
        engine.set_resident_layers(n)
        assert engine.resident_layers == n and engine.loaded
        out = vv.generate(SCRIPT, voices, SETTINGS, executor=engine)
        assert engine.stats()["offload_streamed_layers"] == LAYERS - n
        outs.append(out.waveform)
    if stream_dtype != "fp8":
        expected = ref.waveform if stream_dtype == "bf16" else reference_bf16
        assert all(torch.equal(o, expected) for o in outs)
    else:
        # no layer_source: once streamed in fp8, a layer keeps its fp8-rounded weights, so
        # every layer resident again runs as every layer streamed
        assert torch.equal(outs[0], ref.waveform) and not torch.equal(outs[-1], ref.waveform)
        assert torch.equal(outs[-1], outs[-2]) or torch.allclose(outs[-1], outs[-2], atol=1e-6)
    with pytest.raises(ValueError, match="resident_layers"):
        engine.set_resident_layers(LAYERS + 1)
    engine.close()


def test_fp8_layers_made_resident_again_are_read_from_the_checkpoint(tiny_model_dir, reference):
    """With a `layer_source`, a layer that becomes resident again after streaming in fp8 (loaded
    or not), and every layer `close()` gives back, has the checkpoint's weights: every run
    with all layers resident is the reference audio, bit for bit, whatever was streamed before."""
    voices, ref = reference
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    engine = OffloadEngine(vv.model, OffloadPlan(LAYERS, "fp8"), "cpu", layer_source=vv.checkpoint.read_decoder_layer)
    engine.load()
    for n in (1, LAYERS, 0, 2, LAYERS):
        engine.set_resident_layers(n)
        out = vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform
        assert torch.equal(out, ref.waveform) == (n == LAYERS), n  # streamed layers run rounded
        assert all(engine._host[i].format == NATIVE for i in engine.plan.resident_indices(LAYERS))
    engine.set_resident_layers(1)
    engine.unload()
    engine.set_resident_layers(3)  # unloaded: the next load places the layers read again
    engine.load()
    assert all(engine._host[i].format == NATIVE for i in range(3)) and engine._host[3].format == FP8
    engine.close()  # layer 3 was streamed in fp8: it comes back read from the checkpoint too
    out = vv.generate(SCRIPT, voices, SETTINGS, executor=ResidentExecutor(vv.model)).waveform
    assert torch.equal(out, ref.waveform)


def test_fp8_residency_change_that_runs_out_of_memory_leaves_the_layers_streamable(tiny_model_dir, reference):
    """Layers read back for a residency change whose re-arrangement then runs out of memory
    are streamed again on the next load, in fp8: the same audio as before the change."""
    voices, _ = reference
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    engine = OffloadEngine(vv.model, OffloadPlan(1, "fp8"), "cpu", layer_source=vv.checkpoint.read_decoder_layer)
    engine.load()
    before = vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform
    out_of_memory_on_call(engine, 1)  # the re-arrangement's ring
    with pytest.raises(torch.OutOfMemoryError):
        engine.set_resident_layers(3)
    assert not engine.loaded and engine.resident_layers == 1
    assert torch.equal(vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform, before)
    assert [engine._host[i].format for i in range(LAYERS)] == [NATIVE, FP8, FP8, FP8]
    engine.close()


def test_a_wrong_layer_source_is_refused_and_changes_nothing(tiny_model_dir, reference, caplog):
    voices, ref = reference
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")

    def wrong(i):  # layer 2's copy lacks a tensor
        tensors = vv.checkpoint.read_decoder_layer(i)
        if i == 2:
            tensors.pop("mlp.down_proj.weight")
        return tensors

    engine = OffloadEngine(vv.model, OffloadPlan(1, "fp8"), "cpu", layer_source=wrong)
    engine.load()
    before = vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform
    with pytest.raises(ValueError, match="decoder layer tensor mlp.down_proj.weight: expected .* got missing"):
        engine.set_resident_layers(3)  # layer 1 is read, then layer 2 fails: layer 1 goes back to fp8
    assert engine.resident_layers == 1 and engine._host[1].format == engine._host[2].format == FP8
    assert torch.equal(vv.generate(SCRIPT, voices, SETTINGS, executor=engine).waveform, before)
    with caplog.at_level("WARNING", logger="vibevoice_offload.offload.engine"):
        engine.close()  # closing never fails half way: the streamed layers stay rounded, with a warning
    assert "decoder layer 2 keeps its fp8-rounded weights" in caplog.text and engine.host_bytes == 0
    layers, read = vv.model.model.language_model.layers, vv.checkpoint.read_decoder_layer
    assert torch.equal(layers[1].mlp.down_proj.weight, read(1)["mlp.down_proj.weight"])  # read back
    assert not torch.equal(layers[2].mlp.down_proj.weight, read(2)["mlp.down_proj.weight"])  # rounded


def test_unload_and_close_leave_nothing_behind(tiny_model_dir, reference):
    voices, ref = reference
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(1, "bf16"))
    engine.load()
    engine.load()  # idempotent
    assert engine.host_bytes == LAYERS * engine.native.nbytes
    vv.generate(SCRIPT, voices, SETTINGS, executor=engine)
    engine.unload()
    assert not engine.loaded and engine._ring is None and engine._copy_stream is None
    assert not engine._resident_buffers and not engine._queue
    assert engine.host_bytes == LAYERS * engine.native.nbytes  # slabs kept for a fast reload
    again = vv.generate(SCRIPT, voices, SETTINGS, executor=engine)  # reloads on demand
    assert torch.equal(again.waveform, ref.waveform)
    engine.close()
    assert engine.host_bytes == 0 and not engine.loaded
    gc.collect()
    # the model is an ordinary model again: the resident executor gives the same audio
    out = vv.generate(SCRIPT, voices, SETTINGS, executor=ResidentExecutor(vv.model))
    assert torch.equal(out.waveform, ref.waveform)


def test_host_copy_is_not_duplicated(tiny_model_dir):
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(1, "bf16"))
    engine.load()
    layers = vv.model.model.language_model.layers
    for i in engine.plan.streamed_indices(LAYERS):
        layer, slab = layers[i], engine._host[i].slab
        base = slab.untyped_storage().data_ptr()
        for p in layer.parameters():
            assert p.untyped_storage().data_ptr() == base  # views into the slab, no second copy
    engine.close()


def test_fp8_streamed_layers_release_their_model_dtype_weights(tiny_model_dir):
    vv, engine = engine_for(tiny_model_dir, OffloadPlan(2, "fp8"), dtype="bf16")
    engine.load()
    layer = vv.model.model.language_model.layers[3]
    assert layer.mlp.up_proj.weight.is_meta
    assert not layer.input_layernorm.weight.is_meta
    resident = engine.plan.resident_indices(LAYERS)[0]
    assert 3 not in engine.plan.resident_indices(LAYERS)
    assert engine._host[3].format == "fp8" and engine._host[resident].format == "native"
    assert engine._host[3].nbytes < 0.6 * engine._host[resident].nbytes + 4096
    engine.close()
    assert not layer.mlp.up_proj.weight.is_meta


def _anonymous_rss() -> int:
    """Resident host memory the process allocated (statm: resident minus file-backed pages)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(host_slabs._malloc_trim() is None, reason="needs glibc's malloc_trim (Linux)")
def test_freed_tensors_go_back_to_the_os(tiny_model_dir):
    """glibc serves mid-size tensors from its heap and keeps their pages when they are freed
    below a live allocation: packing, which frees every layer's tensors for its slab, held the
    layers twice (1.33x the model's bytes for 1.5B on the CPU). `return_freed_memory` hands
    those pages back, and the engine calls it after packing."""
    spill = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
    del spill  # glibc now serves tensors under 16 MiB from the heap
    blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(50)]
    keeper = torch.ones(4 << 20, dtype=torch.uint8)  # a live block above them: no automatic trim
    del blocks
    held = _anonymous_rss()
    host_slabs.return_freed_memory()
    assert held - _anonymous_rss() > 150e6
    del keeper

    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    engine = OffloadEngine(vv.model, OffloadPlan(1, "bf16"), "cpu")
    with mock.patch.object(engine_module, "return_freed_memory") as handed_back:
        engine.load()
        assert handed_back.call_count == LAYERS  # after each layer is packed: never two copies of many layers
        engine.close()
        assert handed_back.call_count == LAYERS + 1
