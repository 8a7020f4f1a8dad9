#!/usr/bin/env python
"""GPU time to dequantise one streamed fp8 decoder layer, and how it overlaps compute.

    python bench/dequant_kernels.py [--size Large|1.5B] [--out DIR]

One decoder layer at the real shape (random bf16 weights), packed into its fp8 host slab
as the engine does; the staged slab on the GPU is dequantised into a model-dtype buffer by
`gpu_slots.run_ops` (per linear: `dst.copy_(q); dst.mul_(scale)`, float32 row scales), and
for comparison by variants: the multiply with bfloat16 scales, the cast alone (no scale),
and a fused one-pass Triton kernel when Triton is present. Also timed: the layer's decode
step at batch 2 (both CFG branches, 400 cached positions), and 20 dequantisations on a side
stream while the compute stream runs 20 decode steps (the engine's fp8 pipeline) against
the two run back to back. Medians of CUDA-event timings after warm-up. Writes
<out>/<card>-<yyyymmdd>-dequant.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from vibevoice_offload.offload.gpu_slots import run_ops, upload_ops  # noqa: E402
from vibevoice_offload.offload.host_slabs import FP8, NATIVE, SlabLayout, pack_layer  # noqa: E402
from vibevoice_offload.planner import load_size_config  # noqa: E402


def timed(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)


def triton_dequant():
    """A fused fp8 -> bf16 x row-scale kernel (one read, one write), or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(q_ptr, s_ptr, out_ptr, cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        q = tl.load(q_ptr + row * cols + offs, mask=mask).to(tl.float32)
        scale = tl.load(s_ptr + row)
        tl.store(out_ptr + row * cols + offs, (q * scale).to(tl.bfloat16), mask=mask)

    def run(ops):
        for dst, src, scale in ops:
            if scale is None:
                dst.copy_(src)
                continue
            rows, cols = src.shape
            kernel[(rows, triton.cdiv(cols, 4096))](src, scale, dst, cols, BLOCK=4096)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="Large", choices=("Large", "1.5B"))
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
    from transformers import DynamicCache

    text = load_size_config(args.size).text_config
    text._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(text, 0).to("cuda", torch.bfloat16).eval()
    for p in layer.parameters():
        p.data.normal_(0, 0.02)
    native, fp8 = SlabLayout.build(layer, NATIVE), SlabLayout.build(layer, FP8)
    host = pack_layer(Qwen2DecoderLayer(text, 0).to(torch.bfloat16), fp8, pinned=True)
    staging = torch.empty(fp8.nbytes, dtype=torch.uint8, device="cuda")
    staging[: host.nbytes].copy_(host.slab)
    out = torch.empty(native.nbytes, dtype=torch.uint8, device="cuda")
    ops = upload_ops(native, fp8, out, staging)
    bf16_ops = [(d, s, None if sc is None else sc.to(torch.bfloat16)) for d, s, sc in ops]
    cast_ops = [(d, s, None) for d, s, _ in ops]

    rows: dict[str, float] = {"layer_gb": native.nbytes / 1e9, "fp8_slab_gb": fp8.nbytes / 1e9}
    rows["engine_run_ops_ms"] = timed(lambda: run_ops(ops))
    rows["bf16_scales_ms"] = timed(lambda: run_ops(bf16_ops))
    rows["cast_only_ms"] = timed(lambda: run_ops(cast_ops))
    fused = triton_dequant()
    if fused is not None:
        rows["triton_fused_ms"] = timed(lambda: fused(ops))
        reference = out.clone()
        run_ops(ops)
        reference.copy_(out)
        fused(ops)
        rows["triton_matches_engine"] = bool(torch.equal(reference, out))

    # a decode step of both CFG branches with 400 cached positions
    rotary = Qwen2RotaryEmbedding(text).to("cuda")
    cache = DynamicCache(config=text)
    past = torch.randn(2, 400, text.hidden_size, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(400, device="cuda")[None].expand(2, -1)
    with torch.no_grad():
        layer(past, position_embeddings=rotary(past, pos), past_key_values=cache, use_cache=True)
        x = torch.randn(2, 1, text.hidden_size, device="cuda", dtype=torch.bfloat16)
        step_pos = torch.full((2, 1), 400, device="cuda")
        emb = rotary(x, step_pos)

        def step():
            layer(x, position_embeddings=emb, past_key_values=cache, use_cache=True)
            cache.crop(400)

        rows["decode_step_ms"] = timed(step)
        side = torch.cuda.Stream()

        def serial():
            for _ in range(20):
                run_ops(ops)
                step()

        def overlapped():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(20):
                    run_ops(ops)
            for _ in range(20):
                step()
            torch.cuda.current_stream().wait_stream(side)

        rows["20_dequant_and_step_serial_ms"] = timed(serial, repeats=5)
        rows["20_dequant_and_step_overlapped_ms"] = timed(overlapped, repeats=5)

    card = torch.cuda.get_device_name()
    doc = {"card": card, "date": datetime.date.today().strftime("%Y%m%d"), "size": args.size, "torch": torch.__version__, **rows}
    print(json.dumps(doc, indent=1))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{slug}-{doc['date']}-dequant-{args.size}.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
