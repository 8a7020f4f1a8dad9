"""Large bf16-packed at a 6 GB budget: whole-layer staging slots against layers crossing in
two parts (`OffloadPlan.staging_parts`), four fixed plans on one warm H100, 100 frames each.

    python bench/staging_parts_probe.py     # writes $OUT/parts-probe-Large-6GB.json
"""
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch
from vibevoice_offload import planner, bench_case
from vibevoice_offload.plan import OffloadPlan
from vibevoice_offload.offload.engine import OffloadEngine
from vibevoice_offload.frame_loop import FrameLoop

GB = 10**9
PK = "bf16-packed"
config = planner.load_size_config("Large")
model = bench_case.build_random_model(config)
prompt = bench_case.bench_prompt(config)
bench_case.warm_libraries()
link = bench_case.measure_h2d_gbps()
plans = {
    "whole, 2+2": OffloadPlan(2, PK, 2, True, True, 2, 0, 1, True, 1),
    "parts, 3+2": OffloadPlan(3, PK, 2, True, True, 2, 0, 1, True, 2),
    "parts, 3+1, +2 slots": OffloadPlan(3, PK, 2, True, True, 1, 2, 1, True, 2),
    "whole, 2+2 again": OffloadPlan(2, PK, 2, True, True, 2, 0, 1, True, 1),
}
out = {"card": torch.cuda.get_device_name(), "link_gbps": link, "budget_gb": 6, "rows": {}}
engine = None
for name, plan in plans.items():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    with bench_case.vram_budget(torch.device("cuda", 0), 6 * GB):
        if engine is None:
            engine = OffloadEngine(model, plan, "cuda")
        else:
            engine.unload()
            engine.set_plan(plan)
        engine.load()
        try:
            r = bench_case.timed_frames(FrameLoop(model, engine), prompt, 100)
        except Exception as exc:  # noqa: BLE001
            r = {"error": repr(exc)[:300]}
        engine.unload()
    stats = engine.stats()
    r.update(peak_reserved_gb=torch.cuda.max_memory_reserved() / GB, alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries,
             wait_ms_per_frame=stats.get("offload_wait_ms", 0) / max(stats["offload_passes"], 1), layers_per_pass=stats["offload_layers_per_pass"],
             decoder_pass_ms=stats.get("offload_decoder_pass_ms"),
             predicted_ms=planner.predict_ms_per_frame(config, plan, link, 22.6, decoder_ms=9.16),
             estimate_gb=planner.estimate_for_workload(config, plan, torch.bfloat16, bench_case.prompt_workload(config, prompt, 102)).total_vram / GB,
             plan=str(plan))
    out["rows"][name] = r
    print(name, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "plan"}), flush=True)
engine.close()
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "parts-probe-Large-6GB.json"), "w"), indent=1)
