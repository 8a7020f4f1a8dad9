#!/usr/bin/env python
"""Layer-offload benchmark: this project against every peer, same prompt, same card, same run.

    python bench/offload_bench.py [--quick] [--out DIR]

Random bf16 weights at the real shapes of VibeVoice-1.5B and -Large (configs in
vibevoice_offload/configs/), built in host memory from GPU-drawn random numbers (no
checkpoint is written). Prompt: 2 speakers x 5 s of voice, about 60 characters of script
(character-level tokenizer); 10 diffusion steps; cfg 1.3. The weights are edited so the
speech-frame token always wins (every step is a real frame: LLM, diffusion head,
acoustic decoder, semantic encoder).

Budgets are emulated with `torch.cuda.set_per_process_memory_fraction` and, for this
project, the planner's plan for that budget (`plan_auto`, embed_tokens on the host; it
chooses the ring depth too, rating plans with this run's link and T_resident). The peers
get the decoder layers resident that our bf16 plan with a depth-2 ring keeps at that budget.

Writes <out>/<card>-<yyyymmdd>.json (rows, card, measured pinned H2D bandwidth), a PNG
plot next to it, and a log. Each row is written as soon as its case ends.

Smoke run on a CPU (this project's cases only, on a tiny model with budgets scaled to it;
no VRAM is enforced or measured, the link is the planner's PCIe 4 figure):

    python bench/offload_bench.py --device cpu --quick --out /tmp/offload-quick
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vibevoice_offload.bench_case import (  # noqa: E402
    bench_prompt,
    build_random_model,
    device_usable,
    empty_host_cache,
    measure_h2d_gbps,
    prompt_workload,
    result_stem,
    timed_frames,
    tiny_budgets,
    tiny_config,
    tiny_random_model,
    vram_budget,
    warm_libraries,
)
from vibevoice_offload.offload.host_slabs import return_freed_memory  # noqa: E402
from vibevoice_offload.planner import DEFAULT_PCIE_GEN, GB, PCIE_DEFAULTS  # noqa: E402

FRAME_MS = 3200 / 24000 * 1000  # 133.3 ms of audio per frame
BUDGETS = {"Large": [None, 12, 8, 6], "1.5B": [None, 4, 3]}


def log(*args) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------

def rss_bytes(anonymous: bool = False) -> int:
    """Resident host memory of this process; `anonymous`: without file-backed pages (the
    mapped CUDA, cuDNN and cuBLAS libraries, whose kernels load lazily on first use)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    resident, file_backed = int(fields[1]), int(fields[2])
    return (resident - file_backed if anonymous else resident) * os.sysconf("SC_PAGE_SIZE")


def release_host_memory() -> None:
    """Everything freed back to the OS before host RAM is baselined: Python's garbage,
    PyTorch's cached pinned blocks and glibc's heap, where freed tensors up to 32 MiB stay
    (the baseline would count them and the next model reuse them)."""
    gc.collect()
    empty_host_cache()
    return_freed_memory()


class RssPeak:
    """Peak resident host memory over a case (all of it, and anonymous only), sampled every 10 ms."""

    def __init__(self) -> None:
        self.peak = self.peak_anonymous = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RssPeak":
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_bytes())
        self.peak_anonymous = max(self.peak_anonymous, rss_bytes(anonymous=True))

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ---------------------------------------------------------------------------------------------
# what the peers run under
# ---------------------------------------------------------------------------------------------

class PeerExecutor:
    """What the peers run under: weights where their hooks put them; the acoustic encoder is
    moved to the GPU for the prompt only (as ours does), DynamicCache as stock."""

    def __init__(self, model) -> None:
        self.model = model
        self._device = torch.device("cuda", torch.cuda.current_device())

    @property
    def device(self):
        return self._device

    def decoder_layer(self, index):
        return self.model.model.language_model.layers[index]

    def decoder_layer_done(self, index):
        pass

    def acoustic_encoder(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            enc = self.model.model.audio_tower.encoder
            enc.to(self._device)
            try:
                yield enc
            finally:
                enc.to("cpu")

        return ctx()

    # Their hooks move weights inside the layers' forward calls: no CUDA graphs over the layers.
    capturable = False

    def begin_run(self):
        pass

    def begin_frames(self):
        pass

    def end_run(self):
        pass


class EagerLayers:
    """Our engine with the decoder layers run eagerly (`--graphs speech`: the frame loop as it
    was before the layers were captured)."""

    capturable = False

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)


def place_for_peer(model, resident_layers: int) -> list[int]:
    """Everything ours keeps resident goes to the GPU; embed_tokens and lm_head stay on the host.
    Returns the indices of the decoder layers left to the peer's offloading."""
    core = model.model
    lm = core.language_model
    for module in (lm.norm, lm.rotary_emb, core.diffusion_head, core.audio_tower.decoder,
                   core.semantic_tokenizer_encoder, core.multi_modal_projector, core.semantic_connector):
        module.to("cuda")
    core.latent_scaling_factor.data = core.latent_scaling_factor.data.cuda()
    core.latent_bias_factor.data = core.latent_bias_factor.data.cuda()
    for i in range(resident_layers):
        lm.layers[i].to("cuda")
    return list(range(resident_layers, len(lm.layers)))


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cuda = args.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.card = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32  # the tiny CPU model is float32
        if not self.cuda:
            args.models, args.methods, args.breakdown = ["tiny"], ["ours"], False
            args.dtypes = [d for d in args.dtypes if d != "bf16-packed"]  # packs bf16 weights; the tiny model is float32
            log("cpu: a smoke run of this project's cases on the tiny model (the peers, bf16-packed and --breakdown need CUDA)")
        self.date = datetime.date.today().strftime("%Y%m%d")
        self.json_path = self.out / f"{result_stem(self.card)}.json"
        self.rows: list[dict] = []
        self.t_resident: dict[str, float] = {}
        self.decoder_ms: dict[str, float] = {}  # the decoder pass inside T_resident (GPU timeline)
        self.extra: dict = {}
        self.repeat = 0  # the turn of --repeat running now
        if self.cuda:
            warm_libraries()
            self.link = measure_h2d_gbps()
        else:
            self.link = PCIE_DEFAULTS[DEFAULT_PCIE_GEN]  # no link to measure: the planner's default
        self.first_link = self.link  # the JSON's top-level figure; each row keeps its own call's probe
        gc.collect()
        self.base_rss = rss_bytes()
        log(f"card {self.card}; pinned H2D {self.link:.1f} GB/s{'' if self.cuda else ' (PCIe default)'}; torch {torch.__version__}")
        if args.resume:
            self.resume(Path(args.resume))

    def resume(self, path: Path) -> None:
        """Go on with an earlier run's JSON (same card and date: one GPU call is 10 minutes at
        most); its T_resident and link bandwidth give the bounds of the new rows too."""
        doc = json.loads(path.read_text())
        if doc["card"] != self.card:
            raise SystemExit(f"--resume {path}: measured on {doc['card']}, this is {self.card}")
        self.extra = doc.get("extra", {})
        self.extra.setdefault("link_gbps_resumed_runs", []).append(self.link)
        self.first_link = doc["link_gbps_measured"]
        self.rows, self.t_resident, self.decoder_ms = doc["rows"], doc["t_resident_ms"], doc.get("decoder_pass_ms", {})
        self.date = doc["date"]
        self.json_path = self.out / path.name
        log(f"resuming {path}: {len(self.rows)} rows and T_resident {self.t_resident} from it; this call's link "
            f"{self.link:.1f} GB/s bounds this call's rows")

    def write(self) -> None:
        doc = {"card": self.card, "date": self.date, "link_gbps_measured": self.first_link, "torch": torch.__version__,
               "cuda_graphs": self.args.graphs, "frame_extension": self.args.frame_extension,
               "frames": self.args.frames, "peer_frames": self.args.peer_frames, "slow_frames": self.args.slow_frames,
               "t_resident_ms": self.t_resident, "decoder_pass_ms": self.decoder_ms, "extra": self.extra, "rows": self.rows}
        self.json_path.write_text(json.dumps(doc, indent=1, default=str))

    def case(self, model_name, method, stream_dtype, budget_gb, fn, *, k=0, layer_bytes=0, m=1, model_bytes=0):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            retries_before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        row = {"model": model_name, "method": method, "stream_dtype": stream_dtype, "budget_gb": budget_gb or "full"}
        if self.args.repeat > 1:
            row["repeat"] = self.repeat
        start = time.perf_counter()
        try:
            with vram_budget(self.device, round(budget_gb * GB) if budget_gb else None), RssPeak() as peak:
                res = fn()
            row.update(res)
        except Exception as exc:  # noqa: BLE001 - a peer that fails is a result too
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            log(traceback.format_exc(limit=3))
            peak = None
        finally:
            if self.cuda:
                torch.cuda.synchronize()
        row["wall_s"] = round(time.perf_counter() - start, 1)
        k = row.pop("k", k)
        row["streamed_layers"] = k
        row["crossings_per_frame"] = m
        row["peak_vram_allocated_gb"] = torch.cuda.max_memory_allocated() / GB if self.cuda else None
        row["peak_vram_reserved_gb"] = torch.cuda.max_memory_reserved() / GB if self.cuda else None
        if self.cuda:  # the allocator hitting the emulated budget frees its cache and retries (synchronising)
            row["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries_before
        row["host_ram_gb"] = (peak.peak / GB) if peak else None
        row["host_ram_over_base_gb"] = ((peak.peak - self.base_rss) / GB) if peak else None
        row["model_gb"] = model_bytes / GB
        if peak and model_bytes and getattr(self, "rss_before_model", None):
            row["host_ram_vs_model"] = (peak.peak - self.rss_before_model) / model_bytes
            row["host_ram_anonymous_vs_model"] = (peak.peak_anonymous - self.anonymous_before_model) / model_bytes
        ms = row.get("ms_per_frame")
        row["rtf"] = ms / FRAME_MS if ms else None
        t_res = self.t_resident.get(model_name)
        row["link_probe_gbps"] = self.link  # B of this row's bound: the probe of the call that ran it
        transfer_ms = m * k * layer_bytes / (self.link * GB) * 1000
        row["transfer_ms"] = transfer_ms
        row["bound_ms"] = max(transfer_ms, t_res or 0.0)
        row["vs_bound"] = (ms / row["bound_ms"]) if ms and row["bound_ms"] else None
        if "link_gbps" not in row:
            row["link_gbps"] = (m * k * layer_bytes / (ms * 1e6)) if ms and k else None
        row["effective_gbps"] = (m * k * layer_bytes / (ms * 1e6)) if ms and k else None
        self.rows.append(row)
        self.write()
        brief = {k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in row.items()
                 if k2 in ("model", "method", "stream_dtype", "budget_gb", "streamed_layers", "ms_per_frame", "rtf", "bound_ms",
                           "vs_bound", "peak_vram_reserved_gb", "host_ram_vs_model", "host_ram_anonymous_vs_model", "wait_ms_per_frame", "prefetch_depth", "compute_buffers", "encoded_residents", "resident_layers", "frame_resident_layers", "frame_prefetch_depth", "predicted_ms", "link_gbps", "frames", "tokens", "error")}
        log("ROW", json.dumps(brief))
        return row

    def fresh_model(self, config):
        """A new random model at `config`'s shapes (on a CPU the tiny model, `tiny_config()`) and
        its bytes; host RAM is baselined just before it is built (host_ram_vs_model)."""
        release_host_memory()
        self.rss_before_model = rss_bytes()
        self.anonymous_before_model = rss_bytes(anonymous=True)
        model = self.random_model(config)
        tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
        return model, sum(t.numel() * t.element_size() for t in tensors)

    def random_model(self, config, seed: int = 0):
        return build_random_model(config, seed=seed, draw_on="cuda") if self.cuda else tiny_random_model(seed + 1)

    # -- this project --------------------------------------------------------------------------
    def budgets(self, size, config, prompt) -> list:
        """BUDGETS[size] in GB (None: the whole card); the tiny model's scaled to it."""
        if size != "tiny":
            return BUDGETS[size]
        workload = prompt_workload(config, prompt, self.args.frames + 2)
        return [None, *(b / GB for b in tiny_budgets(config, workload, self.dtype, embed_on_host=True))]

    def ours(self, size, config, prompt, budgets) -> None:
        from vibevoice_offload.offload import OffloadEngine
        from vibevoice_offload.plan import OffloadPlan
        from vibevoice_offload.planner import PlanError, plan_auto, predict_ms_per_frame

        n = config.text_config.num_hidden_layers
        workload = prompt_workload(config, prompt, self.args.frames + 2)
        model, model_bytes = self.fresh_model(config)
        for dtype in self.args.dtypes:
            engine = None
            for budget in budgets:
                if budget is None and dtype != "bf16":
                    continue  # full budget streams nothing: one row
                predicted = None
                if budget is None:
                    plan = OffloadPlan(n, dtype)
                else:
                    # auto picks (resident layers, ring depth) by its ring simulation, with this run's link and
                    # T_resident (the planner's table until the full-budget case has run); --no-deep: depth 2
                    t_res, dec_ms = self.t_resident.get(size), self.decoder_ms.get(size)
                    try:
                        plan = plan_auto(
                            config, round(budget * GB), stream_dtype=dtype, prefetch_depth=None if self.args.deep else 2,
                            embed_on_host=True, dtype=self.dtype, workload=workload, link_gbps=self.link, resident_ms=t_res,
                            decoder_ms=dec_ms, frame_extension=self.args.frame_extension,
                        )
                    except PlanError as exc:
                        self.rows.append({"model": size, "method": "ours", "stream_dtype": dtype, "budget_gb": budget, "error": f"PlanError: {exc}"})
                        self.write()
                        log("ROW", size, "ours", dtype, budget, "PlanError", exc)
                        continue
                    predicted = predict_ms_per_frame(config, plan, self.link, t_res, decoder_ms=dec_ms, dtype=self.dtype)
                if engine is None:
                    engine = OffloadEngine(model, plan, self.device)
                else:
                    engine.unload()
                    engine.set_plan(plan)
                row = self.case(size, "ours", dtype, budget, self._ours_case(model, engine, plan, prompt, predicted),
                                k=n - plan.in_frames().resident_layers, layer_bytes=engine.stream_layout.nbytes, m=1,
                                model_bytes=model_bytes)
                if budget is None and row.get("ms_per_frame"):
                    self._set_resident(size, row)
                    if self.args.breakdown:
                        self.breakdown(size, model, engine, prompt)
                    self.write()
            if engine is not None:
                engine.close()
        if None in budgets and self.t_resident.get(size):
            # T_resident again, last: the first case runs right after the model was built and
            # the bound takes the faster of the two.
            engine = OffloadEngine(model, OffloadPlan(n, "bf16"), self.device)
            row = self.case(size, "ours", "bf16", None, self._ours_case(model, engine, engine.plan, prompt, None),
                            model_bytes=model_bytes)
            row["repeat_of_full"] = True
            engine.close()
            if row.get("ms_per_frame") and row["ms_per_frame"] < self.t_resident[size]:
                self._set_resident(size, row)
            for r in self.rows:
                if r["model"] == size and r["method"] == "ours" and r.get("ms_per_frame"):
                    r["bound_ms"] = max(r["transfer_ms"], self.t_resident[size])
                    r["vs_bound"] = r["ms_per_frame"] / r["bound_ms"]
            self.write()
        del model
        gc.collect()

    def peer_resident_layers(self, config, prompt, budget) -> int:
        """The decoder layers the peers keep resident at `budget`: our bf16 plan's with a depth-2
        ring (which leaves room for their onload buffers)."""
        from vibevoice_offload.planner import PlanError, plan_auto

        try:
            return plan_auto(
                config, round(budget * GB), stream_dtype="bf16", prefetch_depth=2, embed_on_host=True, dtype=self.dtype,
                workload=prompt_workload(config, prompt, self.args.frames + 2),
            ).resident_layers
        except PlanError:
            return 0

    def _set_resident(self, size: str, row: dict) -> None:
        self.t_resident[size] = row["ms_per_frame"]
        self.decoder_ms[size] = row["decoder_pass_ms"]
        row["bound_ms"] = row["ms_per_frame"]
        row["vs_bound"] = 1.0

    def _ours_case(self, model, engine, plan, prompt, predicted):
        def run():
            engine.load()
            res = timed_frames(self.our_loop(model, engine), prompt, self.args.frames)
            stats = engine.stats()
            res["link_gbps"] = stats.get("offload_link_gbps") or None
            res["copy_ms_per_frame"] = stats.get("offload_copy_ms", 0) / max(stats["offload_passes"], 1)
            res["wait_ms_per_frame"] = stats.get("offload_wait_ms", 0) / max(stats["offload_passes"], 1)
            res["layers_per_pass"] = stats["offload_layers_per_pass"]
            res["resident_layers"] = plan.resident_layers
            res["prefetch_depth"] = plan.prefetch_depth
            res["compute_buffers"] = plan.compute_buffers if plan.staged else None
            res["encoded_residents"] = plan.encoded_residents
            # the frames' residency and ring (the frame extension; the bound's k is the frames')
            res["frame_layers"], res["frame_slots"] = plan.frame_layers, plan.frame_slots
            res["frame_resident_layers"] = stats["offload_frame_resident_layers"]
            res["frame_prefetch_depth"] = stats["offload_frame_prefetch_depth"]
            res["predicted_ms"] = predicted
            res["resident_bytes_gb"] = stats["offload_resident_bytes"] / GB
            res["host_slab_gb"] = stats["offload_host_bytes"] / GB
            res["pinned"] = stats["offload_pinned"]
            res["decoder_pass_ms"] = stats.get("offload_decoder_pass_ms")
            return res

        return run

    def our_loop(self, model, engine):
        from vibevoice_offload.frame_loop import FrameLoop

        executor = engine if self.args.graphs == "all" else EagerLayers(engine)
        return FrameLoop(model, executor, cuda_graph=self.args.graphs != "none")

    def breakdown(self, size, model, engine, prompt) -> None:
        """Where a fully resident frame's time goes: synchronised timers around each stage, then
        a short torch.profiler trace (kernel launches per frame, top host-side ops)."""
        from vibevoice_offload.decoder_pass import DecoderPass
        from vibevoice_offload.frame_loop import FrameLoop
        from vibevoice_offload.speech_frame import SpeechFrame

        # Stage timers need the stages to run eagerly; the profile below replays the graph.
        loop = FrameLoop(model, engine, cuda_graph=False)
        spent: dict[str, float] = {}

        def timed(name, fn):
            def wrapper(*a, **kw):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = fn(*a, **kw)
                torch.cuda.synchronize()
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
                return out
            return wrapper

        core = model.model
        step, sample = DecoderPass.step, SpeechFrame._sample_latent
        DecoderPass.step = timed("decoder_pass", step)
        SpeechFrame._sample_latent = timed("diffusion_head_10_steps", sample)
        dec_fwd, sem_fwd = core.audio_tower.decoder.forward, core.semantic_tokenizer_encoder.forward
        core.audio_tower.decoder.forward = timed("acoustic_decoder", dec_fwd)
        core.semantic_tokenizer_encoder.forward = timed("semantic_encoder", sem_fwd)
        frames = 20
        try:
            res = timed_frames(loop, prompt, frames)
        finally:
            del core.audio_tower.decoder.forward, core.semantic_tokenizer_encoder.forward
            DecoderPass.step, SpeechFrame._sample_latent = step, sample
        per_frame = {k: v * 1000 / frames for k, v in spent.items()}
        per_frame["frame_synchronised_ms"] = res["ms_per_frame"]
        # profiler: 5 frames
        from torch.profiler import ProfilerActivity, profile

        loop2 = self.our_loop(model, engine)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_frames(loop2, prompt, 6, skip=0)
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"))
        gpu_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in events)
        per_frame["kernel_launches_per_frame"] = launches / 7
        per_frame["gpu_busy_ms_per_frame"] = gpu_us / 1000 / 7
        table = events.table(sort_by="self_cpu_time_total", row_limit=18)
        (self.out / f"profile-{size}.txt").write_text(table)
        self.extra[f"breakdown_{size}_resident"] = per_frame
        log("BREAKDOWN", size, json.dumps({k: round(v, 2) for k, v in per_frame.items()}))

    # -- peers ----------------------------------------------------------------------------------
    def peer(self, size, config, prompt, method, budget, resident, frames):
        from vibevoice_offload.frame_loop import FrameLoop

        n = config.text_config.num_hidden_layers
        model, model_bytes = self.fresh_model(config)
        layer_bytes = sum(p.numel() * p.element_size() for p in model.model.language_model.layers[0].parameters())
        k = n - resident
        cleanup = []

        def run():
            streamed = place_for_peer(model, resident)
            layers = model.model.language_model.layers
            loop_cls = FrameLoop
            if method == "diffusers":
                from diffusers.hooks import apply_group_offloading

                holder = nn.Module()
                holder.blocks = nn.ModuleList([layers[i] for i in streamed])
                apply_group_offloading(holder, onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1, use_stream=True)
            elif method == "accelerate":
                from accelerate import cpu_offload

                for i in streamed:
                    cpu_offload(layers[i], execution_device=torch.device("cuda"))
            elif method == "seed":
                from seed_design import SeedHooks, SeedLoop

                hooks = SeedHooks([layers[i] for i in streamed], torch.device("cuda"))
                cleanup.append(hooks.remove)
                loop_cls = SeedLoop
            else:
                raise ValueError(method)
            res = timed_frames(loop_cls(model, PeerExecutor(model), cuda_graph=self.args.graphs != "none"), prompt, frames)
            res["k"] = len(streamed)
            return res

        # Our loop runs both CFG branches through a layer as one batch: one forward, one onload a
        # frame (diffusers, accelerate); the seed runs the branches as two passes.
        m = 2 if method == "seed" else 1
        self.case(size, method, "bf16", budget, run, k=k, layer_bytes=layer_bytes, m=m, model_bytes=model_bytes)
        for fn in cleanup:
            fn()
        del model
        gc.collect()
        empty_host_cache()

    def stock_generate(self, size, config, prompt, frames):
        from transformers.generation import UnbatchedClassifierFreeGuidanceLogitsProcessor  # noqa: F401

        from vibevoice_offload.speech_frame import make_scheduler

        model, model_bytes = self.fresh_model(config)

        def generate(new_tokens):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(
                input_ids=prompt.input_ids.cuda(), attention_mask=torch.ones_like(prompt.input_ids).cuda(),
                input_values=prompt.voice_values.cuda().to(torch.bfloat16), padding_mask=prompt.voice_mask.cuda(),
                max_new_tokens=new_tokens, guidance_scale=1.3, num_diffusion_steps=10,
                noise_scheduler=make_scheduler(), return_dict_in_generate=True,
            )
            torch.cuda.synchronize()
            return time.perf_counter() - t, out

        def run():
            model.to("cuda")
            short = 4
            t_short, _ = generate(short)
            t_long, out = generate(short + frames)
            audio = out.audio[0] if hasattr(out, "audio") else None
            res = {"ms_per_frame": (t_long - t_short) * 1000 / frames, "frames": frames,
                   "note": "(t(N+4) - t(4)) / N: prefill excluded; stock logits-CFG processor (3 LLM passes per frame)"}
            if audio is not None:
                res["audio_samples"] = int(audio.numel())
            return res

        self.case(size, "transformers_generate", "bf16", None, run, k=0, layer_bytes=0, m=3, model_bytes=model_bytes)
        del model
        gc.collect()

    def warm_runtime(self, size, config, prompt) -> None:
        """A short run of each stream dtype, one layer streamed, on a throwaway model of this
        size, before any case takes its host RAM baseline. The CUDA runtime loads kernel images
        lazily, on their first launch, and keeps them for the life of the process (with Triton's
        compiled kernels, 1.1-1.2 GB of host memory on the H100; docs/OFFLOADING.md): without this
        the first case of a size pays for them and the cases after it, the peers', do not. What
        the warm-up leaves behind is recorded as `extra["runtime_host_gb"]`."""
        from vibevoice_offload.offload import OffloadEngine
        from vibevoice_offload.plan import OffloadPlan

        release_host_memory()
        before = rss_bytes()
        model = self.random_model(config, seed=1)
        n = config.text_config.num_hidden_layers
        for dtype in self.args.dtypes:  # fp8 last (see --dtypes): it leaves the layers rounded
            engine = OffloadEngine(model, OffloadPlan(n - 1, dtype, prefetch_depth=2), self.device)
            engine.load()
            timed_frames(self.our_loop(model, engine), prompt, 3)
            engine.close()
        del model, engine
        release_host_memory()
        torch.cuda.empty_cache()
        self.extra.setdefault("runtime_host_gb", {})[size] = (rss_bytes() - before) / GB
        log(f"{size}: the warm-up run left {self.extra['runtime_host_gb'][size]:.2f} GB of host memory behind")

    def cases(self, size, config, prompt, budgets) -> None:
        """Every method's cases for one size, ours first."""
        if "ours" in self.args.methods:
            self.ours(size, config, prompt, budgets)
        for budget in (b for b in budgets if b is not None):
            r = self.peer_resident_layers(config, prompt, budget)
            if "diffusers" in self.args.methods:
                self.peer(size, config, prompt, "diffusers", budget, r, self.args.peer_frames)
            if size == "Large" and budget not in (12, 8) and not self.args.all_slow:
                continue
            if "seed" in self.args.methods:
                self.peer(size, config, prompt, "seed", budget, r, self.args.slow_frames * 2)
            if "accelerate" in self.args.methods:
                self.peer(size, config, prompt, "accelerate", budget, r, self.args.slow_frames)
        if "generate" in self.args.methods:
            self.stock_generate(size, config, prompt, self.args.peer_frames)

    def run(self) -> None:
        from vibevoice_offload.planner import load_size_config

        for size in self.args.models:
            config = tiny_config() if size == "tiny" else load_size_config(size)
            prompt = bench_prompt(config)
            log(f"== {size}: prompt {prompt.length} tokens")
            budgets = self.budgets(size, config, prompt)
            if self.args.budgets:
                budgets = [b for b in budgets if b in self.args.budgets]
            if self.cuda:
                self.warm_runtime(size, config, prompt)
            for repeat in range(self.args.repeat):
                self.repeat = repeat  # case() labels its rows with it
                self.cases(size, config, prompt, budgets)
            log(f"== {size} done")
        self.write()
        try:
            log("plot", plot(self.json_path))
        except Exception as exc:  # noqa: BLE001 - matplotlib may be missing on the GPU machine
            log(f"no plot ({exc!r}); run: python bench/offload_bench.py --plot-only {self.json_path}")


def plot(json_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(json_path).read_text())
    rows = [r for r in doc["rows"] if r.get("ms_per_frame")]
    models = sorted({r["model"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(7 * max(len(models), 1), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        full_x = max([r["budget_gb"] for r in mrows if r["budget_gb"] != "full"] + [0]) + 4
        xval = lambda r: full_x if r["budget_gb"] == "full" else r["budget_gb"]  # noqa: E731
        for (method, dtype) in sorted({(r["method"], r["stream_dtype"]) for r in mrows}):
            pts = sorted((xval(r), r["ms_per_frame"]) for r in mrows if r["method"] == method and r["stream_dtype"] == dtype)
            label = f"{method} ({dtype})" if method == "ours" else method
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            if method == "ours":
                bpts = sorted((xval(r), r["bound_ms"]) for r in mrows if r["method"] == method and r["stream_dtype"] == dtype and r.get("bound_ms"))
                ax.plot([p[0] for p in bpts], [p[1] for p in bpts], linestyle="--", color="gray", alpha=0.7,
                        label=f"bound max(k·W/B, T_res) ({dtype})")
        ax.axhline(FRAME_MS, color="red", linestyle=":", label="real time (133 ms)")
        ax.set_yscale("log")
        ax.set_xlabel("VRAM budget (GB); rightmost = full")
        ax.set_ylabel("ms per frame (median)")
        link = mrows[0].get("link_probe_gbps", doc["link_gbps_measured"])
        ax.set_title(f"VibeVoice-{model} on {doc['card']}, pinned H2D {link:.1f} GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(json_path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer frames (smoke run)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu (with --quick): this project's cases on a tiny model, a smoke test of the script")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    parser.add_argument("--models", nargs="+", default=["Large", "1.5B"], choices=["Large", "1.5B"])
    parser.add_argument("--methods", nargs="+", default=["ours", "diffusers", "seed", "accelerate", "generate"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "bf16-packed", "fp8"],
                        help="stream dtypes of this project, in order (fp8 last: closing its engine leaves the model's layers fp8-rounded)")
    parser.add_argument("--frames", type=int, default=150, help="frames per case for this project")
    parser.add_argument("--peer-frames", type=int, default=30, help="frames for diffusers and generate")
    parser.add_argument("--slow-frames", type=int, default=10, help="frames for accelerate (the seed gets twice this)")
    parser.add_argument("--all-slow", action="store_true", help="run accelerate and the seed at every budget")
    parser.add_argument("--breakdown", action="store_true", help="time the stages of a resident frame and profile it")
    parser.add_argument("--no-deep", dest="deep", action="store_false",
                        help="plan with prefetch depth 2 instead of letting plan_auto choose the ring depth per budget")
    parser.add_argument("--no-frame-extension", dest="frame_extension", action="store_false",
                        help="plan without the frame extension (the prompt's VRAM idle during the frames)")
    parser.add_argument("--graphs", choices=("all", "speech", "none"), default="all",
                        help="which halves of our frame replay CUDA graphs: both (the default), only the speech "
                             "half (the loop before the decoder layers were captured), or neither")
    parser.add_argument("--budgets", nargs="+", type=float, help="only these of the size's budgets (GB; the full card is not among them)")
    parser.add_argument("--repeat", type=int, default=1, help="run every case this many times, in turns (rows get a `repeat` index)")
    parser.add_argument("--plot-only", metavar="JSON")
    parser.add_argument("--resume", metavar="JSON", help="append to an earlier run's JSON (same card)")
    args = parser.parse_args(argv)
    if args.plot_only:
        print(plot(Path(args.plot_only)))
        return 0
    if not device_usable(args.device, args.quick):
        return 2
    if args.quick:
        args.frames, args.peer_frames, args.slow_frames = 24, 10, 6
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
