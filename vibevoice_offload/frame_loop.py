"""Our frame loop over transformers' VibeVoice modules.

Why not `generate`: with guidance != 1 transformers adds a logits-CFG processor that runs
a third LLM pass per frame (and changes token choices from the original model), it runs
the negative branch even at cfg 1, and its streamer sees token ids, not audio.

Per frame both CFG branches pass through the decoder layers as one batch (decoder_pass.py),
so a layer streamed from host memory crosses the link once per frame. The positive branch
picks the next token; if it is not a speech frame, the negative branch's step is undone
(the original model only advances the negative branch on frames).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import VibeVoiceForConditionalGeneration

from .config import SAMPLE_RATE, hop_length
from .cuda_graphs import GraphPool
from .decoder_pass import BranchCache, DecoderPass
from .executor import Executor
from .prompt import Prompt
from .speech_frame import SpeechFrame

# (frame number from 1, frame cap, this frame's audio on the CPU) -> False stops generation.
FrameCallback = Callable[[int, int, torch.Tensor], "bool | None"]


@dataclass(frozen=True)
class GenerationSettings:
    cfg: float = 1.3
    steps: int = 10
    seed: int = 0
    max_frames: int | None = None  # cap on generated tokens; default: the prompt length (twice the prompt in all)
    max_seconds: float | None = None

    def frame_cap(self, prompt_length: int, hop: int) -> int:
        # The small epsilon keeps an exact number of frames (7 x 3200 samples) from rounding up to 8.
        seconds_cap = self.max_seconds and math.ceil(self.max_seconds * SAMPLE_RATE / hop - 1e-6)
        caps = [c for c in (self.max_frames, seconds_cap) if c]
        return int(min(caps)) if caps else prompt_length


@dataclass
class GenerationResult:
    waveform: torch.Tensor  # float32 [samples] on the CPU, 24 kHz
    sample_rate: int
    stats: dict[str, Any] = field(default_factory=dict)


class FrameLoop:
    """Generates one dialog from a prompt with a given executor (weight placement)."""

    decoder_pass = DecoderPass  # how the branches go through the layers (the bench's seed design swaps it)

    def __init__(self, model: VibeVoiceForConditionalGeneration, executor: Executor, *, cuda_graph: bool = True) -> None:
        self.model = model
        self.executor = executor
        # On CUDA, replay both halves of each frame from CUDA graphs (the decoder half only
        # where the executor's layers allow it).
        self.cuda_graph = cuda_graph
        self.config = model.config
        self.lm = model.model.language_model
        self.device = executor.device
        self.dtype = self.lm.norm.weight.dtype
        self.allowed = [
            self.config.audio_bos_token_id,
            self.config.audio_eos_token_id,
            self.config.audio_token_id,
            self.config.eos_token_id,
        ]

    # --- pieces -----------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.lm.embed_tokens
        return table(ids.to(table.weight.device)).to(self.device, self.dtype)

    def _voice_embeddings(self, prompt: Prompt, generator: torch.Generator) -> torch.Tensor:
        """Voice clips -> connector embeddings for the frame placeholders (as transformers'
        `get_audio_features` with `sample=True`, its noise drawn from our seeded generator)."""
        with self.executor.acoustic_encoder() as encoder:
            latents = encoder(prompt.voice_values.to(self.device, self.dtype)).latents
        noise_std = self.config.audio_config.vae_std * torch.randn(latents.shape[0], generator=generator)
        # randn_like semantics: the encoder's latents are a transposed view and noise fills them in memory order.
        noise = torch.empty_like(latents, device="cpu", dtype=torch.float32).normal_(generator=generator)
        noise = noise_std[:, None, None] * noise
        latents = latents + noise.to(self.device, self.dtype)
        core = self.model.model
        features = (latents + core.latent_bias_factor) * core.latent_scaling_factor
        frames = torch.ceil(prompt.voice_mask.sum(dim=-1) / hop_length(self.config)).long()
        valid = torch.arange(features.shape[1])[None, :] < frames[:, None]
        return core.multi_modal_projector(features[valid.to(self.device)])

    # --- the loop ---------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, prompt: Prompt, settings: GenerationSettings, on_frame: FrameCallback | None = None) -> GenerationResult:
        if settings.steps < 1:
            raise ValueError(f"steps must be at least 1, got {settings.steps}")
        if settings.cfg < 1.0:
            raise ValueError(f"cfg must be at least 1.0, got {settings.cfg}")
        core = self.model.model
        hop = hop_length(self.config)
        cap = settings.frame_cap(prompt.length, hop)
        use_cfg = settings.cfg != 1.0
        generator = torch.Generator().manual_seed(settings.seed)
        # Only four tokens can ever be chosen: a 4-row slice of lm_head replaces the full head.
        allowed = torch.tensor(self.allowed)
        head_rows = self.model.lm_head.weight[allowed.to(self.model.lm_head.weight.device)].to(self.device, self.dtype)
        on_cuda = self.device.type == "cuda"
        if on_cuda:  # peak VRAM of this run (process-wide counters, as torch keeps them)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()

        ids = prompt.input_ids
        embeds = self._embed(ids)
        placeholders = (ids[0] == self.config.audio_token_id).nonzero().squeeze(1).to(self.device)
        embeds[0, placeholders] = self._voice_embeddings(prompt, generator).to(self.dtype)

        graphs = GraphPool(self.device) if self.cuda_graph and on_cuda else None
        rows = 2 if use_cfg else 1  # row 0 the positive branch, row 1 the negative one
        self.executor.begin_run()
        cache = BranchCache(self.config.text_config, rows, prompt.length + cap, self.device, self.dtype)
        decoder = self.decoder_pass(self.lm, self.executor, cache, graphs if self.executor.capturable else None)
        speech = SpeechFrame(self.model, self.device, self.dtype, steps=settings.steps, cfg=settings.cfg, graphs=graphs)
        prompts = [(0, embeds)]
        if use_cfg:
            prompts.append((1, self._embed(torch.tensor([[self.config.audio_bos_token_id]]))))
        del embeds
        latent_size = self.config.audio_config.hidden_size
        chunks: list[torch.Tensor] = []
        generated = 0
        stopped_by_callback = False
        try:
            hidden = decoder.run_rows(prompts)
            del prompts
            self.executor.begin_frames()
            prefill_done = time.perf_counter()
            while True:
                token = self.allowed[int((hidden[0] @ head_rows.T).argmax(dim=-1))]
                generated += 1
                if token == self.config.audio_token_id:
                    noise = torch.randn(2, latent_size, generator=generator)
                    audio, next_embeds = speech(noise, hidden[0:1], hidden[1:2] if use_cfg else None)
                    chunk = audio.float().cpu()
                    chunks.append(chunk)
                    if on_frame is not None and on_frame(len(chunks), cap, chunk) is False:
                        stopped_by_callback = True
                        break
                else:
                    if use_cfg:
                        # The negative branch only advances on frames: undo the step it just took.
                        cache.undo_last(1)
                        if token == self.config.audio_bos_token_id:
                            cache.hide_before_now(1)
                    if token == self.config.audio_eos_token_id:
                        speech.reset_tokenizers()
                    if token == self.config.eos_token_id:
                        break
                    next_embeds = self._embed(torch.tensor([[token]]))
                if generated >= cap:
                    break
                hidden = decoder.step(next_embeds)
        finally:
            speech_graph = speech.captured
            decoder_graphs = decoder.captured_layers
            # The sampler's history lives in the graphs' pool: drop it before the pool (an
            # error's traceback must not keep it alive either). The pool frees every graph.
            speech.release()
            if graphs is not None:
                graphs.release()
            self.executor.end_run()

        end = time.perf_counter()
        waveform = torch.cat(chunks) if chunks else torch.zeros(0)
        frames = len(chunks)
        stats = {
            "frames": frames,
            "tokens": generated,
            "frame_cap": cap,
            "audio_seconds": waveform.numel() / SAMPLE_RATE,
            "prompt_tokens": prompt.length,
            "prefill_ms": (prefill_done - start) * 1000,
            "ms_per_frame": (end - prefill_done) * 1000 / max(generated, 1),
            "total_s": end - start,
            "stopped": "callback" if stopped_by_callback else ("end" if generated < cap else "cap"),
            "cfg": settings.cfg,
            "steps": settings.steps,
            "seed": settings.seed,
            "speech_graph": speech_graph,
            "decoder_layer_graphs": decoder_graphs,
        }
        stats["rtf"] = stats["ms_per_frame"] / (hop / SAMPLE_RATE * 1000)
        if on_cuda:
            stats["peak_vram_bytes"] = torch.cuda.max_memory_allocated(self.device)
            stats["peak_vram_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return GenerationResult(waveform, SAMPLE_RATE, stats)
