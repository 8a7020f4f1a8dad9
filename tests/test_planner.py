"""VRAM planner: sizes checked against hand arithmetic on the real configs, CPU only."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from vibevoice_offload import planner
from vibevoice_offload.config import load_config
from vibevoice_offload.plan import STREAM_DTYPES, OffloadPlan
from vibevoice_offload.planner import (
    DEFAULT_WORKLOAD,
    GB,
    PRESETS,
    PlanError,
    Workload,
    add_table_command,
    budget_from_free,
    estimate,
    format_table,
    free_vram_bytes,
    kv_cache_bytes,
    link_bandwidth_gbps,
    load_size_config,
    model_sizes,
    parse_vram,
    plan_auto,
    plan_manual,
    plan_preset,
    plan_table,
    predict_ms_per_frame,
    real_time_factor,
)

RELEASED_CONFIGS = Path(__file__).resolve().parent / "data"  # the released models' config.json, one folder each
KiB = 1024


@pytest.fixture(scope="module")
def large():
    return load_size_config("Large")


@pytest.fixture(scope="module")
def small():
    return load_size_config("1.5B")


def _by_hand(raw_decoder: dict) -> dict[str, int]:
    """Element counts of one Qwen2 decoder layer from the original config's numbers."""
    h, i = raw_decoder["hidden_size"], raw_decoder["intermediate_size"]
    kv = raw_decoder["num_key_value_heads"] * (h // raw_decoder["num_attention_heads"])
    linear_weights = h * h + kv * h + kv * h + h * h + 3 * h * i  # q, k, v, o, gate/up/down
    rows = h + kv + kv + h + i + i + h  # out_features of the same seven
    biases_and_norms = (h + kv + kv) + 2 * h  # q/k/v biases, input and post-attention norms
    return {"linear": linear_weights, "rows": rows, "rest": biases_and_norms}


def _raw(size: str) -> dict:
    return json.loads((RELEASED_CONFIGS / f"VibeVoice-{size}" / "config.json").read_text())["decoder_config"]


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("size", "expected_bf16", "expected_fp8", "mb"), [
    ("Large", 466_115_584, 233_268_224, 466.1),
    ("1.5B", 93_595_648, 46_895_104, 93.6),
])
def test_decoder_layer_bytes_match_hand_arithmetic(size, expected_bf16, expected_fp8, mb):
    counts = _by_hand(_raw(size))
    bf16 = 2 * (counts["linear"] + counts["rest"])
    fp8 = counts["linear"] * 1 + counts["rows"] * 4 + counts["rest"] * 2
    assert (bf16, fp8) == (expected_bf16, expected_fp8)

    sizes = model_sizes(load_size_config(size))
    assert sizes.layers == (expected_bf16,) * 28
    assert sizes.layers_fp8 == (expected_fp8,) * 28
    assert round(sizes.layers[0] / 1e6, 1) == mb  # VIBEVOICE.md
    assert sizes.layers_fp8[0] / sizes.layers[0] == pytest.approx(0.5, abs=0.002)


@pytest.mark.parametrize("size", ["Large", "1.5B"])
def test_packed_layer_bytes_are_the_engines_layout_at_the_real_shapes(size):
    """The planner's census against the engine's own slab layout of a real-shape layer (on
    the meta device): bf16-packed is 3/4 of the layer plus the exception lists."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from vibevoice_offload.offload.host_slabs import PACKED, SlabLayout

    config = load_size_config(size)
    with torch.device("meta"):
        layer = Qwen2DecoderLayer(config.text_config, 0).to(torch.bfloat16)
    sizes = model_sizes(config)
    assert sizes.layers_packed == (SlabLayout.build(layer, PACKED).nbytes,) * 28
    assert sizes.layers_packed[0] / sizes.layers[0] == pytest.approx(0.75 + 5 / 512, abs=0.001)


def test_float32_model_doubles_the_layer(large):
    assert model_sizes(large, torch.float32).layers[0] == 2 * 466_115_584


def test_components_match_config_and_vibevoice_md(large, small):
    big, little = model_sizes(large), model_sizes(small)
    assert big.embed_tokens == 152064 * 3584 * 2
    assert big.lm_head == 152064 * 3584 * 2  # separate in Large
    assert little.embed_tokens == 151936 * 1536 * 2
    assert little.lm_head == 0  # tied to embed_tokens in 1.5B
    assert big.lm_head_slice == 4 * 3584 * 2 and little.lm_head_slice == 4 * 1536 * 2
    assert big.norm == 3584 * 2 and little.norm == 1536 * 2
    assert big.acoustic_connector == 2 * (64 * 3584 + 3584 + 3584 + 3584 * 3584 + 3584)  # fc1, norm, fc2
    assert little.semantic_connector == 2 * (128 * 1536 + 1536 + 1536 + 1536 * 1536 + 1536)
    # Rounded figures of VIBEVOICE.md's size table.
    assert round(big.total / GB, 2) == 18.69 and round(little.total / GB, 2) == 5.41
    assert round(big.diffusion_head / GB, 3) == 1.339 and round(little.diffusion_head / GB, 3) == 0.247
    for sizes in (big, little):
        for part in (sizes.acoustic_encoder, sizes.acoustic_decoder, sizes.semantic_encoder):
            assert round(part / GB, 2) == 0.69


def test_model_folder_and_packaged_config_agree(large):
    from_folder, _ = load_config(RELEASED_CONFIGS / "VibeVoice-Large")
    assert model_sizes(from_folder) == model_sizes(large)


# ---------------------------------------------------------------------- estimate

WORK = Workload(voice_samples=(10 * 24000, 7 * 24000 + 1), max_frames=900, text_tokens=400)


def _estimate(config, plan, workload=WORK, **kw):
    return estimate(config, plan, voice_samples=workload.voice_samples, max_frames=workload.max_frames,
                    text_tokens=workload.text_tokens, **kw)


def test_kv_cache_per_token(large, small):
    assert kv_cache_bytes(large, 1) == 56 * KiB
    assert kv_cache_bytes(small, 1) == 28 * KiB


def test_kv_cache_counts_all_layers_and_both_branches(large):
    # prompt: 400 text + ceil(240000/3200)=75 + ceil(168001/3200)=53 voice frames + 48 + 2 x 8
    prompt = 400 + 75 + 53 + 48 + 16
    positions = 1536  # each branch: prompt + 900 = 1492, rounded up to whole 256-position views
    assert prompt + 900 == 1492
    expected = 2 * positions * 28 * 2 * 4 * 128 * 2
    for resident in (0, 5, 28):  # streamed layers keep their KV on the GPU too
        assert _estimate(large, OffloadPlan(resident, "bf16")).kv_cache == expected


def test_slots(large):
    layer, layer_fp8 = 466_115_584, 233_268_224
    assert _estimate(large, OffloadPlan(0, "bf16", prefetch_depth=3)).slots == 3 * layer
    assert _estimate(large, OffloadPlan(28, "bf16")).slots == 0
    assert _estimate(large, OffloadPlan(27, "bf16", prefetch_depth=3)).slots == layer  # one layer: one slot
    # fp8: depth half-size staging slots + two bf16 compute buffers (gpu_slots.SlotRing)
    assert _estimate(large, OffloadPlan(10, "fp8")).slots == 2 * layer + 2 * layer_fp8
    assert _estimate(large, OffloadPlan(0, "fp8", prefetch_depth=14)).slots == 2 * layer + 14 * layer_fp8
    assert _estimate(large, OffloadPlan(27, "fp8", prefetch_depth=5)).slots == 2 * layer + layer_fp8
    assert _estimate(large, OffloadPlan(28, "fp8")).slots == 0


def test_released_layers_need_no_slab_padding(large, small):
    """Every tensor of a released decoder layer is a multiple of 256 bytes, so the engine's
    aligned slab is the hand-computed size (the tiny models of test_planner_engine.py are not)."""
    from vibevoice_offload.offload.host_slabs import ALIGN

    for config in (large, small):
        census = planner._census(config)
        for t in census.layers[0].tensors:
            assert (t.numel * 2) % ALIGN == 0 and (t.numel % ALIGN == 0 if t.rows else True)
            assert (t.rows * 4) % ALIGN == 0


def test_host_slabs_are_every_layer_in_its_slab_format(large):
    layer, layer_fp8 = 466_115_584, 233_268_224
    assert _estimate(large, OffloadPlan(8, "bf16")).host_slabs == 28 * layer  # resident layers keep their slab
    assert _estimate(large, OffloadPlan(8, "fp8")).host_slabs == 8 * layer + 20 * layer_fp8
    assert _estimate(large, OffloadPlan(28, "fp8")).host_slabs == 28 * layer
    on_host = _estimate(large, OffloadPlan(8, "bf16", embed_on_host=True))
    assert on_host.resident_weights == _estimate(large, OffloadPlan(8, "bf16")).resident_weights - 152064 * 3584 * 2
    assert on_host.host_ram == _estimate(large, OffloadPlan(8, "bf16")).host_ram  # the host copy is kept either way


def test_voice_clips_are_encoded_as_one_padded_batch(large):
    one = _estimate(large, OffloadPlan(6, "bf16"), Workload((239_999,), 900, 400))  # padded to 75 x 3200
    two = _estimate(large, OffloadPlan(6, "bf16"), Workload((240_000, 100_000), 900, 400))
    weights = model_sizes(large).acoustic_encoder
    assert two.acoustic_encoder_peak - weights == 2 * (one.acoustic_encoder_peak - weights)
    # the stem's 32 channels x 240,000 samples is the widest point: 3 + 2 x 4 bf16 tensors + 8 bytes of float32
    assert one.acoustic_encoder_peak == weights + 240_000 * (4 + 2) + 32 * 240_000 * (11 * 2 + 8)
    assert _estimate(large, OffloadPlan(6, "bf16"), Workload((), 900, 400)).acoustic_encoder_peak == 0


def test_host_ram_is_the_slabs_plus_every_other_part_of_the_model(large, small):
    """The engine keeps the host copy of everything it places on the GPU: host RAM is the
    whole model, with the decoder layers at their slab sizes (fp8 halves the streamed ones)."""
    for config in (large, small):
        sizes = model_sizes(config)
        for plan in (OffloadPlan(5, "fp8"), OffloadPlan(5, "bf16"), OffloadPlan(28, "bf16")):
            est = _estimate(config, plan)
            assert est.host_ram == est.host_slabs + sizes.total - sum(sizes.layers)
        assert _estimate(config, OffloadPlan(0, "bf16")).host_ram == sizes.total
    assert round(_estimate(large, OffloadPlan(0, "fp8")).host_ram / GB, 2) == 12.17  # 18.69 - 28 x 0.233


def test_lm_head_rows_are_the_frame_loops_not_the_engines(large):
    est = _estimate(large, OffloadPlan(6, "bf16"))
    assert est.lm_head_rows == 4 * 3584 * 2
    assert est.frame_phase == est.weights + est.lm_head_rows + est.kv_cache + est.diffusion_and_tokenizer_workspace


def test_total_is_the_larger_phase_plus_slack(large):
    est = _estimate(large, OffloadPlan(6, "bf16"))
    peak = max(est.prefill_phase, est.frame_phase)
    assert est.allocator_slack == math.ceil(peak * 2 / 100) + 128 * 2**20
    assert est.total_vram == peak + est.allocator_slack
    assert est.prefill_phase > est.frame_phase  # a 483-token prompt costs more than a frame


def test_longer_audio_needs_more_vram(large):
    short = _estimate(large, OffloadPlan(6, "bf16"), Workload.for_minutes(1))
    long = _estimate(large, OffloadPlan(6, "bf16"), Workload.for_minutes(20))
    assert long.kv_cache > short.kv_cache and long.total_vram > short.total_vram


@pytest.mark.parametrize("stream_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("size", ["1.5B", "Large"])
def test_more_resident_layers_need_more_vram(size, stream_dtype):
    config = load_size_config(size)
    totals = [_estimate(config, OffloadPlan(r, stream_dtype)).total_vram for r in range(29)]
    assert all(a < b for a, b in zip(totals[:26], totals[1:27]))  # 0..26 (two-slot ring): strictly increasing
    # At the top the ring shrinks to one slot, then disappears.
    if stream_dtype == "bf16":
        assert totals[26] == totals[27] == totals[28]  # 26 + 2 slots = 27 + 1 slot = 28 layers
    else:
        # 27 resident: one more bf16 layer, one fewer fp8 staging slot; 28: no ring at all
        assert totals[26] < totals[27] and totals[28] < totals[27]


# ---------------------------------------------------------------------- modes


@pytest.mark.parametrize("budget_gb", [7.5, 8, 10, 12, 16, 20.5, 24])
@pytest.mark.parametrize("stream_dtype", ["bf16", "fp8"])
def test_auto_with_a_fixed_depth_picks_the_most_layers_that_fit(large, budget_gb, stream_dtype):
    budget = int(budget_gb * GB)
    plan = plan_auto(large, budget, stream_dtype=stream_dtype, workload=WORK, prefetch_depth=2, frame_extension=False)
    assert plan.prefetch_depth == 2
    assert _estimate(large, plan).total_vram <= budget
    for more in range(plan.resident_layers + 1, 29):
        assert _estimate(large, dataclasses.replace(plan, resident_layers=more)).total_vram > budget


def _ring_shapes(config, budget: int, stream_dtype: str) -> list[OffloadPlan]:
    """Brute force: every ring auto weighs (depth 2..28; a staged format with two compute
    buffers or one; bf16-packed with decoded or encoded residents), each with the most
    resident layers whose estimate fits."""
    shapes = []
    for encoded in (False, True) if stream_dtype == "bf16-packed" else (False,):
        for compute_buffers in (2, 1) if stream_dtype != "bf16" else (2,):
            for depth in range(2, 29):
                shape = OffloadPlan(0, stream_dtype, depth, compute_buffers=compute_buffers, encoded_residents=encoded)
                fits = [r for r in range(29) if _estimate(config, dataclasses.replace(shape, resident_layers=r)).total_vram <= budget]
                if fits:
                    shapes.append(dataclasses.replace(shape, resident_layers=max(fits)))
    return shapes


@pytest.mark.parametrize("budget_gb", [7, 8, 10, 12, 16, 24])
@pytest.mark.parametrize("stream_dtype", ["bf16", "fp8", "bf16-packed"])
@pytest.mark.parametrize("link_gbps", [25.0, 55.0])
def test_auto_chooses_the_fastest_ring_that_fits(large, budget_gb, stream_dtype, link_gbps):
    """auto's plan is one of the brute-forced ring shapes, fits, and no shape is predicted
    more than AUTO_DEPTH_GAIN faster; within one compute-buffer count a deeper ring never
    holds more resident layers, decoding on use never fewer than two compute buffers, and encoded
    residents never fewer than decoded ones."""
    budget = int(budget_gb * GB)
    plan = plan_auto(large, budget, stream_dtype=stream_dtype, workload=WORK, link_gbps=link_gbps, frame_extension=False)
    shapes = _ring_shapes(large, budget, stream_dtype)
    assert _estimate(large, plan).total_vram <= budget
    if plan.resident_layers == 28 and not plan.encoded_residents:
        assert plan == OffloadPlan(28, stream_dtype)
        return
    assert plan in shapes
    ms = predict_ms_per_frame(large, plan, link_gbps)
    for other in shapes:
        assert predict_ms_per_frame(large, other, link_gbps) >= ms * (1 - planner.AUTO_DEPTH_GAIN) - 1e-9, other
    by_shape = {(s.encoded_residents, s.compute_buffers, s.prefetch_depth): s.resident_layers for s in shapes}
    for (encoded, buffers, depth), resident in by_shape.items():
        assert resident <= by_shape[(encoded, buffers, 2)]
        if buffers == 2 and (encoded, 1, depth) in by_shape:
            assert by_shape[(encoded, 1, depth)] >= resident
        if encoded:
            assert resident >= by_shape.get((False, buffers, depth), 0)


def test_encoded_residents_hold_a_third_more_layers_where_the_link_bounds_the_frame(large, small):
    """bf16-packed at the H100 benchmark's budgets: auto keeps the residents encoded where
    the frame waits on the link (more layers in the same VRAM, fewer bytes streamed), and
    only there: with every layer fitting decoded, nothing is decoded."""
    work = Workload((120_000, 120_000), 60, 152)
    options = dict(stream_dtype="bf16-packed", workload=work, link_gbps=55.0, embed_on_host=True)
    for config, budget_gb in ((large, 8), (large, 12)):  # (1.5B at 4 GB sits at T_resident either way)
        plan = plan_auto(config, budget_gb * GB, **options)
        assert plan.encoded_residents, (budget_gb, plan)
        assert _estimate(config, plan, work).total_vram <= budget_gb * GB
        best_decoded = min(
            (s for s in _ring_shapes(config, budget_gb * GB, "bf16-packed") if not s.encoded_residents),
            key=lambda s: predict_ms_per_frame(config, s, 55.0),
        )
        assert plan.in_frames().resident_layers > best_decoded.resident_layers
        assert predict_ms_per_frame(config, plan, 55.0) < predict_ms_per_frame(config, best_decoded, 55.0)
    assert plan_auto(large, 30 * GB, **options) == OffloadPlan(28, "bf16-packed", embed_on_host=True)
    assert not plan_auto(large, 30 * GB, stream_dtype="fp8", workload=work, link_gbps=55.0).encoded_residents


def test_fp8_fits_below_where_bf16_does(large, small):
    """Decoded on use, fp8's smallest ring (two half-size staging slots and the largest
    weight) is bf16's (two layers) less a layer plus a weight (and the row scales), where two
    compute buffers cost two layers more: auto falls back to it at the smallest budgets."""
    for config in (large, small):
        sizes = model_sizes(config)
        saved = sizes.layers[0] - sizes.largest_weights[0]
        bf16 = _estimate(config, OffloadPlan(0, "bf16")).total_vram
        fp8 = OffloadPlan(0, "fp8", compute_buffers=1)
        need = _estimate(config, fp8).total_vram
        assert 0.95 * saved <= bf16 - need <= 1.05 * saved  # the allocator slack (2% of the peak) shrinks too
        assert _estimate(config, OffloadPlan(0, "fp8")).total_vram - need >= model_sizes(config).layers[0]
        assert plan_auto(config, need, stream_dtype="fp8", workload=WORK, link_gbps=25.0, frame_extension=False) == fp8
        # two compute buffers asked for: they do not fit there, decoding on use does
        with pytest.raises(PlanError, match=r"streaming every decoder layer needs .*decoded a layer ahead\).*Mode 'auto', decoding on use, fits"):
            plan_auto(config, need, stream_dtype="fp8", workload=WORK, link_gbps=25.0, compute_buffers=2)
        with pytest.raises(PlanError, match=f"minimum for this model and audio length is {need / 1e9:.2f} GB"):
            plan_auto(config, need - 1, stream_dtype="fp8", workload=WORK, link_gbps=25.0)


def test_auto_deepens_the_ring_only_where_the_simulation_says_it_pays(large, small):
    """A slot costs a resident layer; it pays only while the ring can fill it during the
    stretch of the frame without a streamed layer. With the residents spread over the pass
    (`residency_order`) that stretch is the rest of the frame alone: for Large two bf16 slots
    (17 ms of copies) cover it; for 1.5B at 4 GB each slot traded for a resident layer
    predicts the same 37.7 ms (2 to 6 slots), and a tie keeps the shallower ring. (With the
    residents bunched at the pass's start, as in the first H100 runs, auto took 7 resident
    layers and 5 slots there.) fp8's half-size staging slots are cheap enough to deepen the ring."""
    work = Workload((120_000, 120_000), 60, 201)

    def both(config, budget_gb, dtype):
        # the prompt's plans: the frame extension (tested below) deepens both rings in the frames
        options = dict(workload=work, embed_on_host=True, stream_dtype=dtype, link_gbps=55.0, frame_extension=False)
        return plan_auto(config, budget_gb * GB, prefetch_depth=2, **options), plan_auto(config, budget_gb * GB, **options)

    shallow, deep = both(small, 4, "bf16")
    assert deep == shallow
    shallow, deep = both(large, 12, "bf16")
    assert deep == shallow
    # fp8's half-size staging slots make depth cheap: three more cost one resident layer
    shallow, deep = both(large, 12, "fp8")
    assert deep.prefetch_depth > 2
    assert predict_ms_per_frame(large, deep, 55.0) < (1 - planner.AUTO_DEPTH_GAIN) * predict_ms_per_frame(large, shallow, 55.0)
    assert plan_auto(large, 30 * GB, workload=work, link_gbps=55.0) == OffloadPlan(28, "bf16")  # all resident: no ring


@pytest.mark.parametrize("size,budget_gb,stream_dtype", [
    ("1.5B", 3, "bf16"), ("1.5B", 4, "fp8"), ("Large", 8, "bf16"), ("Large", 8, "fp8"), ("Large", 8, "bf16-packed"),
])
def test_frame_extension_spends_only_the_prompts_memory(size, budget_gb, stream_dtype):
    """auto's frame extension lives in the VRAM the voice encoding needed: the plan's VRAM
    stays the same, the frames stay FRAME_EXTENSION_MARGIN under the prompt phase, and the
    frames stream fewer layers through a ring at least as deep."""
    config = load_size_config(size)
    work = Workload((120_000, 120_000), 60, 152)
    options = dict(stream_dtype=stream_dtype, workload=work, link_gbps=55.0, embed_on_host=True)
    extended = plan_auto(config, budget_gb * GB, **options)
    plain = dataclasses.replace(extended, frame_layers=0, frame_slots=0)  # the prompt's plan
    assert (extended.frame_layers, extended.frame_slots) != (0, 0)
    assert planner.with_frame_extension(config, plain, torch.bfloat16, work, 55.0) == extended
    est, est_plain = _estimate(config, extended, work), _estimate(config, plain, work)
    assert est.total_vram == est_plain.total_vram <= budget_gb * GB
    assert 0 < est.frame_extension <= est.prefill_phase - est_plain.frame_phase - planner.FRAME_EXTENSION_MARGIN
    assert est.frame_phase <= est.prefill_phase - planner.FRAME_EXTENSION_MARGIN
    sizes = model_sizes(config)
    frames = extended.in_frames()
    assert est.frame_extension == sum(sizes.resident_bytes(i, plain) for i in range(plain.resident_layers, frames.resident_layers)) + (
        planner.ring_bytes(sizes, frames, 28) - planner.ring_bytes(sizes, plain, 28)
    )
    assert planner.bound_ms_per_frame(config, extended, 55.0) == planner.bound_ms_per_frame(config, frames, 55.0)
    assert predict_ms_per_frame(config, extended, 55.0) < (1 - planner.AUTO_DEPTH_GAIN) * predict_ms_per_frame(config, plain, 55.0)


def test_no_frame_extension_without_room(large):
    """All layers resident: nothing to extend; no prompt (no voices, one frame): the frames need as much as the prompt."""
    assert plan_auto(large, 30 * GB, workload=WORK, link_gbps=55.0) == OffloadPlan(28, "bf16")
    tight = Workload((), 60, 1)
    plan = plan_auto(large, 8 * GB, workload=tight, link_gbps=55.0)
    assert (plan.frame_layers, plan.frame_slots) == (0, 0)
    assert plan == plan_auto(large, 8 * GB, workload=tight, link_gbps=55.0, frame_extension=False)


def test_auto_values_are_plausible(large, small):
    assert plan_auto(small, 12 * GB, workload=WORK).resident_layers == 28
    assert plan_auto(large, 30 * GB, workload=WORK).resident_layers == 28
    assert 0 < plan_auto(large, 12 * GB, workload=WORK).resident_layers < 28


def test_auto_refusal_names_the_minimum(large):
    minimum = _estimate(large, OffloadPlan(0, "bf16")).total_vram
    with pytest.raises(PlanError) as info:
        plan_auto(large, 4 * GB, workload=WORK)
    message = str(info.value)
    assert f"{minimum / 1e9:.2f} GB" in message and "4.00 GB" in message
    assert "embed_tokens on the host" in message
    assert plan_auto(large, minimum, workload=WORK).resident_layers == 0
    with pytest.raises(PlanError, match=f"streaming every decoder layer needs .* is {minimum / 1e9:.2f} GB .*To run: "):
        plan_auto(large, minimum - 1, workload=WORK)


def test_preset_shares_mean_the_same_for_both_models(large, small):
    expected = {"light": 21, "moderate": 14, "balanced": 9, "aggressive": 4, "extreme": 0}
    assert {name: float(share) for name, share in PRESETS.items()} == {
        "light": 0.75, "moderate": 0.5, "balanced": 0.35, "aggressive": 0.15, "extreme": 0.0,
    }
    for config in (large, small):
        got = {name: plan_preset(config, name).resident_layers for name in PRESETS}
        assert got == expected
    for name, share in PRESETS.items():
        for layers in (28, 40, 7):
            resident = planner.preset_resident_layers(name, layers)
            assert resident <= share * layers < resident + 1


def test_preset_that_does_not_fit_is_refused(large):
    with pytest.raises(PlanError) as info:
        plan_preset(large, "light", 12 * GB, workload=WORK)
    need = _estimate(large, OffloadPlan(21, "bf16")).total_vram
    assert f"{need / 1e9:.2f} GB" in str(info.value) and "12.00 GB" in str(info.value)
    assert "auto" in str(info.value)
    with pytest.raises(PlanError, match="unknown offload preset"):
        plan_preset(large, "medium")


def test_refused_preset_points_to_auto_where_decoding_on_use_fits(large):
    """Large fp8 at 8 GB: 'extreme' (decoded a layer ahead) does not fit, auto (decoded on
    use) does; the refusal states both minimums and says so, without the hints for when
    nothing fits."""
    budget = 8 * GB
    with pytest.raises(PlanError) as info:
        plan_preset(large, "extreme", budget, stream_dtype="fp8", workload=DEFAULT_WORKLOAD)
    message = str(info.value)
    ahead = _estimate(large, OffloadPlan(0, "fp8"), DEFAULT_WORKLOAD).total_vram
    auto = plan_auto(large, budget, stream_dtype="fp8", workload=DEFAULT_WORKLOAD, link_gbps=25.0)
    on_use = _estimate(large, auto, DEFAULT_WORKLOAD).total_vram
    assert on_use <= budget < ahead
    assert (
        f"is {ahead / 1e9:.2f} GB (all 28 decoder layers streamed, fp8, prefetch depth 2, decoded a layer ahead); "
        f"{on_use / 1e9:.2f} GB as mode 'auto' plans it (fp8, prefetch depth 2, decoded on use). Mode 'auto', decoding on use, fits this budget."
    ) in message
    assert "1.5B" not in message and "To run" not in message


def test_refusal_when_nothing_fits_gives_both_minimums_and_the_hints(large):
    budget = 6 * GB
    with pytest.raises(PlanError) as info:
        plan_preset(large, "extreme", budget, stream_dtype="fp8", workload=DEFAULT_WORKLOAD)
    message = str(info.value)
    ahead = _estimate(large, OffloadPlan(0, "fp8"), DEFAULT_WORKLOAD).total_vram
    on_use = _estimate(large, OffloadPlan(0, "fp8", compute_buffers=1), DEFAULT_WORKLOAD).total_vram
    assert budget < on_use < ahead
    assert f"is {ahead / 1e9:.2f} GB" in message and f"{on_use / 1e9:.2f} GB as mode 'auto' plans it" in message
    assert "fits this budget" not in message and "use the 1.5B model" in message
    with pytest.raises(PlanError, match=f"is {on_use / 1e9:.2f} GB .*decoded on use\\)\\. To run: .*use the 1.5B model"):
        plan_auto(large, budget, stream_dtype="fp8", workload=DEFAULT_WORKLOAD, link_gbps=25.0)


def test_manual_plans(large):
    assert plan_manual(large, 7, "fp8", 3, False) == OffloadPlan(7, "fp8", 3, False)
    with pytest.raises(PlanError, match=r"has 28; choose 0\.\.28 .* needs \d+\.\d\d GB"):
        plan_manual(large, 29)
    with pytest.raises(PlanError, match="prefetch_depth"):
        plan_manual(large, 7, "bf16", 1)
    with pytest.raises(PlanError, match="needs"):
        plan_manual(large, 28, budget_bytes=10 * GB, workload=WORK)


def test_manual_bf16_packed_keeps_every_layer_decoded_where_they_fit_so(large):
    """Nothing streams with every layer resident, so packed residents would only add the
    decodings: decoded where the budget holds them, packed where only that fits, refused
    below; fewer layers stay packed whatever the budget."""
    decoded = _estimate(large, OffloadPlan(28, "bf16-packed")).total_vram
    packed = _estimate(large, OffloadPlan(28, "bf16-packed", encoded_residents=True)).total_vram
    assert packed < decoded - 2 * GB  # 28 x 112 MB saved, less the compute buffers
    for budget in (None, decoded):
        assert not plan_manual(large, 28, "bf16-packed", budget_bytes=budget, workload=WORK).encoded_residents
    assert plan_manual(large, 28, "bf16-packed", budget_bytes=decoded - 1, workload=WORK).encoded_residents
    with pytest.raises(PlanError, match="needs"):
        plan_manual(large, 28, "bf16-packed", budget_bytes=packed - 1, workload=WORK)
    assert plan_manual(large, 27, "bf16-packed", budget_bytes=40 * GB, workload=WORK).encoded_residents
    assert not plan_manual(large, 28, "fp8", workload=WORK).encoded_residents


@pytest.mark.parametrize(("plan", "field"), [
    (OffloadPlan(-1, "bf16"), "resident_layers"),
    (OffloadPlan(29, "bf16"), "resident_layers"),
    (OffloadPlan(3, "int8"), "stream_dtype"),  # type: ignore[arg-type]
    (OffloadPlan(3, "bf16", prefetch_depth=1), "prefetch_depth"),
    (OffloadPlan(3, "bf16", pinned="yes"), "pinned"),  # type: ignore[arg-type]
    (OffloadPlan(3, "bf16", embed_on_host=1), "embed_on_host"),  # type: ignore[arg-type]
    (OffloadPlan(3, "fp8", compute_buffers=3), "compute_buffers"),
    (OffloadPlan(3, "fp8", compute_buffers=0), "compute_buffers"),
    (OffloadPlan(3, "fp8", encoded_residents=True), "encoded_residents"),
    (OffloadPlan(3, "bf16-packed", encoded_residents=1), "encoded_residents"),  # type: ignore[arg-type]
])
def test_validate_names_the_bad_field(plan, field):
    with pytest.raises(ValueError, match=field):
        plan.validate(28)


# ---------------------------------------------------------------------- speed


def test_speed_bound_matches_performance_md(large):
    # PERFORMANCE.md: 17 bf16 layers over PCIe 5 (54.3 GB/s) ~ 17 x 8.5 ms = 145 ms.
    ms = planner.bound_ms_per_frame(large, OffloadPlan(11, "bf16"), 54.3)
    assert ms == pytest.approx(17 * 466_115_584 / 54.3e9 * 1000)
    assert 144 < ms < 147
    # fp8 at 26 streamed layers: about 26 x 4.3 = 110 ms.
    assert planner.bound_ms_per_frame(large, OffloadPlan(2, "fp8"), 54.3) == pytest.approx(26 * 233_268_224 / 54.3e9 * 1000)
    # Nothing streamed: the resident frame time bounds it.
    assert predict_ms_per_frame(large, OffloadPlan(28, "bf16"), 25.0) == planner.DEFAULT_RESIDENT_MS["Large"] == planner.RESIDENT_FRAME["Large"].ms
    assert planner.bound_ms_per_frame(large, OffloadPlan(27, "bf16"), 25.0, resident_ms=70.0) == 70.0
    assert real_time_factor(large, 133.0) == pytest.approx(133.0 / (1000 * 3200 / 24000))
    for plan in (OffloadPlan(11, "bf16"), OffloadPlan(0, "fp8", 6), OffloadPlan(27, "bf16"), OffloadPlan(20, "fp8", 3)):
        for link in (12.0, 25.0, 54.3):
            assert predict_ms_per_frame(large, plan, link) >= planner.bound_ms_per_frame(large, plan, link)


def test_resident_frame_table_says_what_is_measured(large, small):
    recorded = json.loads(H100.read_text())
    for config, size in ((large, "Large"), (small, "1.5B")):
        frame = planner.resident_frame(config)
        assert frame.measured and H100.name in frame.source
        assert round(recorded["t_resident_ms"][size], 1) == frame.ms
        assert round(recorded["decoder_pass_ms"][size], 1) == frame.decoder_ms


def test_residency_order_spreads_lossless_residents_and_keeps_fp8_first_layers():
    from vibevoice_offload.plan import residency_order

    for n in (1, 2, 3, 4, 6, 8, 28):
        for stream_dtype in STREAM_DTYPES:
            assert sorted(residency_order(n, stream_dtype)) == list(range(n))
    assert residency_order(28, "fp8") == tuple(range(28))  # rounding early layers compounds: they stay exact
    for stream_dtype in ("bf16", "bf16-packed"):
        order = residency_order(28, stream_dtype)
        assert order[-2:] == (0, 27)  # the layers next to the rest of the frame come last
        for r in range(2, 9):  # small prefixes are spread: no two residents side by side
            resident = sorted(order[:r])
            assert all(b - a > 1 for a, b in zip(resident, resident[1:])), r
    # the simulation's default is the lossless order; bunched residents cost the link time
    bunched = planner.simulate_frame_ms(28, 4, 2, 0.33, 14.5, 6.5, order=range(28))
    assert planner.simulate_frame_ms(28, 4, 2, 0.33, 14.5, 6.5) < bunched - 1.0


def test_ring_simulation():
    sim = planner.simulate_frame_ms
    # Nothing streamed: layers then the rest.
    assert sim(4, 4, 2, 1.0, 10.0, 5.0) == 14.0
    # Copies far faster than compute: compute-bound, the ring adds nothing.
    assert sim(4, 0, 2, 1.0, 10.0, 0.01) == pytest.approx(14.0)
    # Copies far slower: link-bound, k copies per frame back to back.
    assert sim(4, 0, 4, 1.0, 10.0, 50.0) == pytest.approx(200.0)
    # A ring of S slots only gets S copies ahead during the 'other' part: depth 1 serialises.
    serial = sim(4, 0, 1, 1.0, 10.0, 5.0)
    assert serial == pytest.approx(4 * (5.0 + 1.0) + 10.0 - 5.0)  # only the next frame's first copy overlaps the rest
    assert sim(4, 0, 2, 1.0, 10.0, 5.0) < serial and sim(4, 0, 4, 1.0, 10.0, 5.0) <= sim(4, 0, 2, 1.0, 10.0, 5.0)
    # Staged (fp8, bf16-packed) decoded ahead: a staging slot frees when its layer's decoding
    # ends, before the layer runs, so one slot does not serialise copies with compute as
    # bf16's does. The decodings share the GPU with the layers: where the link keeps up, the
    # frame is the GPU's work, 4 x (3 + 0.5) + 1 ms.
    gpu_bound = 4 * (3.0 + 0.5) + 1.0
    assert sim(4, 0, 1, 3.0, 1.0, 2.5, staged=True, dequant_ms=0.5) == pytest.approx(gpu_bound, rel=0.01)
    assert sim(4, 0, 1, 3.0, 1.0, 2.5, staged=False, dequant_ms=0.5) == pytest.approx(22.0)  # bf16: each copy waits for compute
    # Decoded on use the slot is held until its layer ran, as bf16's: 4 x (2.5 + 3 + 0.5) ms,
    # the next frame's first copy under the rest of the frame.
    assert sim(4, 0, 1, 3.0, 1.0, 2.5, staged=True, dequant_ms=0.5, compute_buffers=1) == pytest.approx(24.0)
    # Decoding slower than compute: still the sum, 10 + 4 x (1 + 2) ms.
    assert sim(4, 0, 4, 1.0, 10.0, 0.1, staged=True, dequant_ms=2.0) == pytest.approx(22.0, rel=0.02)
    assert sim(4, 0, 4, 1.0, 10.0, 0.1, staged=True, dequant_ms=2.0, compute_buffers=1) == pytest.approx(22.0)
    # Where the layers wait for the link, the decodings run in the wait: 4 copies of 10 ms.
    assert sim(4, 0, 2, 1.0, 1.0, 10.0, staged=True, dequant_ms=0.5) == pytest.approx(40.0)
    # Encoded residents, nothing streamed: every layer is decoded, all of it GPU time.
    assert sim(4, 4, 2, 1.0, 10.0, 5.0, staged=True, dequant_ms=0.5, encoded_residents=True) == pytest.approx(16.0, rel=0.01)
    assert sim(4, 4, 2, 1.0, 10.0, 5.0, staged=True, dequant_ms=0.5, encoded_residents=True, compute_buffers=1) == pytest.approx(16.0)
    # ... and with a streamed layer its copies bound the frame: one slot (one layer to
    # stream), so each copy also waits for the decoding out of it: 30 + 0.5 ms.
    assert sim(4, 3, 2, 1.0, 10.0, 30.0, staged=True, dequant_ms=0.5, encoded_residents=True) == pytest.approx(30.5, rel=0.01)


H100 = Path(__file__).resolve().parents[1] / "bench/results/NVIDIA-H100-80GB-HBM3-20261127.json"


def _h100_rows():
    doc = json.loads(H100.read_text())
    return doc, [r for r in doc["rows"] if r["method"] == "ours" and r.get("ms_per_frame")]


def _h100_config(row, large, small):
    return large if row["model"] == "Large" else small


def _h100_plan(row):
    return OffloadPlan(
        row["resident_layers"], row["stream_dtype"], row["prefetch_depth"], True, row["resident_layers"] < 28,
        row.get("frame_layers", 0), row.get("frame_slots", 0), row.get("compute_buffers") or 2, bool(row.get("encoded_residents")),
    )


def test_estimate_against_the_h100_measurements(large, small):
    """The committed H100 run (150 frames, both sizes): the engine's resident bytes and host
    slabs equal the estimate to the byte, and peak reserved VRAM is within 5% of the estimate
    (the issue's target). It measured 0.98-1.01x: the allocator's slack (reserved minus
    allocated) at the prompt pass varies with fragmentation, 200-330 MB, while the estimate
    allows 2% + 128 MiB. Allocated memory: within 0.4% for bf16; the staged rings (fp8,
    bf16-packed) of 1.5B peak 0.8-1.0% above the estimate at the prompt pass (32-39 MB that
    the estimate does not yet explain), so 1.5% is allowed."""
    doc, rows = _h100_rows()
    assert {r["model"] for r in rows} == {"Large", "1.5B"} and len(rows) >= 12
    for row in rows:
        config = _h100_config(row, large, small)
        # offload_bench's workload: 2 x 5 s voices, a 341-token prompt, frames + 2 frames of room
        text = 341 - 2 * math.ceil(120_000 / 3200) - planner.PROMPT_FIXED_TOKENS - 2 * planner.PROMPT_TOKENS_PER_SPEAKER
        est = estimate(config, _h100_plan(row), voice_samples=(120_000, 120_000), max_frames=doc["frames"] + 2, text_tokens=text)
        assert est.weights == round(row["resident_bytes_gb"] * 1e9), row
        assert est.host_slabs == round(row["host_slab_gb"] * 1e9), row
        measured = row["peak_vram_reserved_gb"] * 1e9
        assert 0.95 * measured <= est.total_vram <= 1.05 * measured, (row["model"], row["stream_dtype"], row["budget_gb"], est.total_vram / measured)
        allocated = row["peak_vram_allocated_gb"] * 1e9
        assert abs(est.total_vram - est.allocator_slack - allocated) <= 0.015 * allocated, row


def test_prediction_against_the_h100_measurements(large, small):
    """The committed H100 frame times against the prediction with that run's link, T_resident
    and decoder pass, for every offloaded row of both sizes and every stream dtype: the
    issue's target is 15%; they measured -4.7% to +6.0%, so 7% is asserted. The probe that sets
    B is a 1 GiB copy at the start of each call, and the copies of a case drift from it by a
    few percent: the Large rows ran 1-5% faster than predicted (their call's probe read 52.2
    GB/s, the layers crossed at up to 53.7), the 1.5B bf16 row at 4 GB 6.0% slower (its copies
    moved at 52.7 GB/s against 54.9; at that rate, 3.5%). (Before decodings shared the GPU in
    the simulation, the 1.5B bf16-packed row at 4 GB was 10% under.)"""
    doc, rows = _h100_rows()
    offloaded = [row for row in rows if row["budget_gb"] != "full"]
    assert {(r["model"], r["stream_dtype"]) for r in offloaded} == {(m, d) for m in ("Large", "1.5B") for d in STREAM_DTYPES}
    for row in offloaded:
        config = _h100_config(row, large, small)
        predicted = predict_ms_per_frame(
            config, _h100_plan(row), row.get("link_probe_gbps", doc["link_gbps_measured"]), doc["t_resident_ms"][row["model"]],
            decoder_ms=doc["decoder_pass_ms"][row["model"]],
        )
        assert row["ms_per_frame"] == pytest.approx(predicted, rel=0.07), (row["model"], row["stream_dtype"], row["budget_gb"], predicted)


def test_link_bandwidth_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert link_bandwidth_gbps() == 25.0
    assert link_bandwidth_gbps(pcie_gen=5) == 54.0


def test_link_bandwidth_cache_is_keyed_by_gpu_name(monkeypatch, tmp_path):
    cache = tmp_path / "link.json"
    cache.write_text(json.dumps({"Some GPU": 13.5, "Fake GPU": 31.25}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: {torch.device("cuda", 1): "Fake GPU"}[device])
    monkeypatch.setattr(planner, "measure_link_gbps", lambda **kw: pytest.fail("measured despite a cached value"))
    assert link_bandwidth_gbps(cache_file=cache, device="cuda:1") == 31.25
    measured_on = []
    monkeypatch.setattr(planner, "measure_link_gbps", lambda device: measured_on.append(device) or 40.0)
    assert link_bandwidth_gbps(cache_file=cache, refresh=True, device="cuda:1") == 40.0
    assert measured_on == [torch.device("cuda", 1)]  # the device asked for, whose name keys the cache
    assert json.loads(cache.read_text()) == {"Some GPU": 13.5, "Fake GPU": 40.0}


# ---------------------------------------------------------------------- budget


def _fake_pynvml(free: int | None, calls: list[str]) -> types.ModuleType:
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        calls.append("init")
        if free is None:
            raise NVMLError("Driver Not Loaded")

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlShutdown = lambda: calls.append("shutdown")
    module.nvmlDeviceGetHandleByIndex = lambda index: calls.append(f"handle {index}") or index
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(free=free, total=2 * free, used=free)
    return module


def test_free_vram_from_nvml_shuts_nvml_down(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(7 * GB, calls))
    assert free_vram_bytes(1) == 7 * GB
    assert calls == ["init", "handle 1", "shutdown"]


def test_free_vram_falls_back_to_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(None, []))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (5 * GB, 10 * GB))
    assert free_vram_bytes() == 5 * GB


def test_free_vram_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(None, []))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PlanError, match=r"Driver Not Loaded.*torch.cuda is not available.*--vram"):
        free_vram_bytes()


def test_budget_from_free():
    assert budget_from_free(10 * GB) == 9 * GB
    assert budget_from_free(10 * GB, 0.5) == 5 * GB
    with pytest.raises(ValueError, match=r"target_utilisation must be in \(0, 1\], got 1.5"):
        budget_from_free(10 * GB, 1.5)


@pytest.mark.parametrize(("text", "expected"), [
    ("12GB", 12 * GB), ("12G", 12 * GB), ("12", 12 * GB), ("8.5GB", 8_500_000_000),
    ("12gb", 12 * GB), (" 6 GB ", 6 * GB), ("8GiB", 8 * 2**30), ("512MB", 512 * 10**6),
])
def test_parse_vram(text, expected):
    assert parse_vram(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "twelve", "12TB", "-4GB", "0", "nanGB", "1.2.3G"])
def test_parse_vram_rejects(text):
    with pytest.raises(ValueError, match="VRAM"):
        parse_vram(text)


# ---------------------------------------------------------------------- table and CLI


def test_table_lists_every_mode_and_marks_what_does_not_fit(large):
    rows = plan_table(large, 10 * GB, "bf16", link_gbps=25.0, workload=WORK)
    assert [r.mode for r in rows] == ["auto", *PRESETS]
    by_mode = {r.mode: r for r in rows}
    auto = plan_auto(large, 10 * GB, link_gbps=25.0, workload=WORK).in_frames()
    assert by_mode["auto"].note == f"frames: {auto.resident_layers} resident, depth {auto.prefetch_depth}"
    assert by_mode["auto"].vram_bytes <= 10 * GB
    light_need = _estimate(large, OffloadPlan(21, "bf16")).total_vram
    assert by_mode["light"].note == f"does not fit (needs {light_need / 1e9:.2f} GB)"
    text = format_table(rows)
    for name in ["auto", *PRESETS]:
        assert name in text
    assert "does not fit (needs" in text


@pytest.mark.parametrize("stream_dtype", ["bf16", "fp8", "bf16-packed"])
def test_table_prices_the_plans_the_presets_run(large, stream_dtype):
    """Each preset row is the plan `plan_preset` returns (bf16-packed keeps its residents
    packed), priced and rated as such."""
    rows = {r.mode: r for r in plan_table(large, 12 * GB, stream_dtype, link_gbps=25.0, workload=WORK)}
    for name in PRESETS:
        plan = plan_preset(large, name, stream_dtype=stream_dtype, workload=WORK)
        assert rows[name].vram_bytes == _estimate(large, plan).total_vram, name
        assert rows[name].ms_per_frame == predict_ms_per_frame(large, plan, 25.0), name
        assert ("residents kept packed" in rows[name].note) == plan.encoded_residents, name


def test_table_when_nothing_fits(large):
    rows = plan_table(large, 1 * GB, "fp8", link_gbps=25.0, workload=WORK)
    assert all(r.note.startswith("does not fit") for r in rows)
    assert rows[0].resident_layers == 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vibevoice")
    add_table_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_table_command(capsys):
    args = _parser().parse_args(["table", "--size", "1.5B", "--vram", "8.5GB", "--stream-dtype", "fp8", "--link-gbps", "30"])
    assert args.vram == 8_500_000_000
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "VibeVoice-1.5B" in out and "budget 8.50 GB" in out and f"T_resident {planner.RESIDENT_FRAME['1.5B'].ms:.1f} ms/frame (measured" in out
    for name in ["auto", *PRESETS]:
        assert name in out


def test_table_command_with_model_folder(capsys):
    args = _parser().parse_args(["table", "--model", str(RELEASED_CONFIGS / "VibeVoice-Large"), "--vram", "12", "--link-gbps", "25"])
    assert args.func(args) == 0
    assert "VibeVoice-Large" in capsys.readouterr().out


def test_table_command_rejects_bad_vram(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["table", "--vram", "lots"])
    assert "cannot read VRAM amount 'lots'" in capsys.readouterr().err


def test_table_command_without_vram_or_gpu_fails_clearly(monkeypatch, capsys):
    def no_gpu(device_index=0):
        raise PlanError("cannot read the free VRAM of GPU 0: no driver. Pass the VRAM budget explicitly (e.g. --vram 12GB).")

    monkeypatch.setattr(planner, "free_vram_bytes", no_gpu)
    args = _parser().parse_args(["table", "--size", "Large"])
    assert args.func(args) == 2
    assert "--vram 12GB" in capsys.readouterr().err


def test_table_command_without_vram_uses_free_vram(monkeypatch, capsys):
    monkeypatch.setattr(planner, "free_vram_bytes", lambda device_index=0: 10 * GB)
    args = _parser().parse_args(["table", "--size", "Large", "--link-gbps", "25"])
    assert args.func(args) == 0
    assert "budget 9.00 GB (90% of 10.00 GB free)" in capsys.readouterr().out


# ---------------------------------------------------------------------- on a GPU


def _host_clock_gbps(nbytes: int, repeats: int = 5) -> float:
    """Pinned host->device GB/s by another route than `measure_link_gbps`: PyTorch's own
    pinned memory, each copy timed by the host clock up to its synchronisation."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    target.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return nbytes / statistics.median(seconds) / GB


@pytest.mark.gpu
def test_link_bandwidth_is_measured_once_per_gpu(tmp_path):
    """Measured on the current GPU as fast as an independent timing of the same copies
    (a pageable probe would be several times slower), then read from the cache."""
    cache = tmp_path / "link.json"
    measured = link_bandwidth_gbps(cache_file=cache)
    assert measured == pytest.approx(_host_clock_gbps(planner._LINK_PROBE_BYTES), rel=0.2)
    assert json.loads(cache.read_text()) == {torch.cuda.get_device_name(): round(measured, 2)}
    assert link_bandwidth_gbps(cache_file=cache) == round(measured, 2)


@pytest.mark.gpu
def test_free_vram_on_a_gpu_is_the_drivers_count():
    """NVML's free memory (read without a CUDA context) is CUDA's own count for the device,
    and drops by what this process allocates (to the allocator's rounding and other
    processes' noise: 64 MiB)."""
    cuda_free, _ = torch.cuda.mem_get_info(0)  # creates the context first: both counts include it
    before = free_vram_bytes(0)
    assert before == pytest.approx(cuda_free, abs=64 * 2**20)
    ballast = torch.empty(2 * GB, dtype=torch.uint8, device="cuda:0")
    assert before - free_vram_bytes(0) == pytest.approx(2 * GB, abs=64 * 2**20)
    del ballast
    torch.cuda.empty_cache()
