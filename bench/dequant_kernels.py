#!/usr/bin/env python
"""GPU time to decode one streamed staged decoder layer (fp8, bf16-packed), and how it
overlaps compute.

    python bench/dequant_kernels.py [--size Large|1.5B] [--out DIR]

One decoder layer at the real shape (random bf16 weights, std 0.02), packed into its host
slab of each staged format as the engine does; the staged slab on the GPU is decoded into a
model-dtype buffer by `dequant.dequantise`, with the fused Triton kernels and with torch's
kernels (fp8: `copy_`, then `mul_` by the float32 row scales; bf16-packed: the reference
decoder, which allocates). Also timed: the layer's decode step at batch 2 (both CFG
branches, 400 cached positions), and 20 decodings on a side stream while the compute stream
runs 20 decode steps (the engine's pipeline) against the two back to back. Medians of
CUDA-event timings after warm-up. Writes <out>/<card>-<yyyymmdd>-dequant-<size>.json with
one block of keys per format.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from vibevoice_offload.bench_case import result_stem  # noqa: E402
from vibevoice_offload.offload.dequant import _fp8_kernel, _packed_kernel, dequant_ops, dequantise  # noqa: E402
from vibevoice_offload.offload.host_slabs import FP8, NATIVE, PACKED, SlabLayout, pack_layer, point_layer  # noqa: E402
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
    host_layer = copy.deepcopy(layer).cpu()  # what each format's host slab is packed from
    native = SlabLayout.build(layer, NATIVE)
    weights = pack_layer(copy.deepcopy(host_layer), native, pinned=False).slab.to("cuda")
    point_layer(layer, native, weights)  # the step below runs from `weights`, like a compute buffer
    rows: dict[str, float] = {"layer_gb": native.nbytes / 1e9}

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

    for fmt, kernel in ((FP8, _fp8_kernel), (PACKED, _packed_kernel)):
        stream = SlabLayout.build(host_layer, fmt)
        host = pack_layer(copy.deepcopy(host_layer), stream, pinned=True)
        staging = torch.empty(stream.nbytes, dtype=torch.uint8, device="cuda")
        staging[: host.nbytes].copy_(host.slab)
        out = torch.empty(native.nbytes, dtype=torch.uint8, device="cuda")
        ops = dequant_ops(native, stream, out, staging)
        rows[f"{fmt}_slab_gb"] = stream.nbytes / 1e9
        rows[f"{fmt}_fused_kernel_available"] = kernel(out.device) is not None
        rows[f"{fmt}_torch_kernels_ms"] = timed(lambda: dequantise(ops, fused_kernel=False))
        reference = out.clone()
        rows[f"{fmt}_fused_kernel_ms"] = timed(lambda: dequantise(ops))
        rows[f"{fmt}_fused_matches_torch"] = bool(torch.equal(reference, out))
        if fmt == PACKED:
            rows[f"{fmt}_equals_the_bf16_layer"] = bool(torch.equal(out, weights))
        side = torch.cuda.Stream()

        def serial():
            for _ in range(20):
                dequantise(ops)
                step()

        def overlapped():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(20):
                    dequantise(ops)
            for _ in range(20):
                step()
            torch.cuda.current_stream().wait_stream(side)

        with torch.no_grad():
            rows[f"{fmt}_20_decode_and_step_serial_ms"] = timed(serial, repeats=5)
            rows[f"{fmt}_20_decode_and_step_overlapped_ms"] = timed(overlapped, repeats=5)
        del host, staging, out

    card = torch.cuda.get_device_name()
    doc = {"card": card, "date": datetime.date.today().strftime("%Y%m%d"), "size": args.size, "torch": torch.__version__, **rows}
    print(json.dumps(doc, indent=1))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{result_stem(card)}-dequant-{args.size}.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
