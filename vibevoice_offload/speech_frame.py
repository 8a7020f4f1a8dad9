"""The speech half of a frame: from the branches' hidden states and the frame's noise to the
frame's audio and the next input embedding (diffusion sampling, the streaming acoustic
decoder and semantic encoder, the two connectors).

Why a class of its own: on a GPU this half is about 3,700 small kernels a frame (ten
diffusion-head steps with their scheduler updates, about 950 in each tokenizer), launched
one at a time from Python, so the host, not the GPU, bounded it (48.7 of 88.3 ms of a
resident Large frame on an H100). Its shapes never change within a run, the sampler's
schedule is the same every frame, and transformers' tokenizer caches are updated in place
(they keep fixed addresses for exactly this), so on CUDA it is captured once per run as a
CUDA graph (cuda_graphs.py) and replayed: one launch a frame, the same kernels on the same
addresses.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler
from transformers import VibeVoiceForConditionalGeneration

from .cuda_graphs import GraphPool


def make_scheduler() -> DPMSolverMultistepScheduler:
    """The original model's sampler: DPM-Solver multistep, v-prediction, cosine schedule."""
    return DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


class SpeechFrame:
    """One run's speech-frame computation, eager or replayed from a CUDA graph.

    Inputs are copied into fixed buffers, so the eager path (no `graphs`, or the first
    frame) and the graph run the same code on the same addresses. The returned
    tensors are overwritten by the next frame: copy out what must outlive it.
    """

    def __init__(
        self,
        model: VibeVoiceForConditionalGeneration,
        device: torch.device,
        dtype: torch.dtype,
        *,
        steps: int,
        cfg: float,
        graphs: GraphPool | None,
    ) -> None:
        self.core = model.model
        self.steps = steps
        self.cfg = cfg
        config = model.config
        self.scheduler = make_scheduler()
        self.scheduler.set_timesteps(num_inference_steps=steps)
        # One host-to-device copy per run (each pageable copy synchronises the stream), and none
        # inside the graph; same values as transformers' `t.repeat(n).to(latent)`.
        self.timesteps = self.scheduler.timesteps.to(device)
        # Noise is drawn for both rows even at cfg 1, so the random stream (hence the audio)
        # does not depend on cfg.
        self.noise = torch.zeros(2, config.audio_config.hidden_size, device=device, dtype=dtype)
        self.condition = torch.zeros(2 if cfg != 1.0 else 1, config.text_config.hidden_size, device=device, dtype=dtype)
        self.acoustic_cache: Any = None  # transformers' conv padding caches, created by the first frame
        self.semantic_cache: Any = None
        self.graphs = graphs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, noise: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """noise [2, latent] (any device), positive/negative [1, hidden] -> (audio [samples],
        next input embedding [1, 1, hidden]) on the device."""
        self.noise.copy_(noise)
        self.condition[0].copy_(positive[0])
        if negative is not None:
            self.condition[1].copy_(negative[0])
        if self.graph is not None:
            self.graph.replay()
            return self.graph_outputs
        outputs = self._compute()
        if self.graphs is not None:
            # The eager first frame created the tokenizer caches and loaded every kernel
            # (cuBLAS, cuDNN): what capture needs. Capturing runs no kernel, so the caches
            # keep this frame's state.
            self._capture(like=outputs)
        return outputs

    def reset_tokenizers(self) -> None:
        """A speech segment ended: the streaming tokenizers start afresh, as the original.

        In place, so a captured graph keeps its addresses: a fresh cache is all zeros."""
        for cache in (self.acoustic_cache, self.semantic_cache):
            if cache is not None:
                for layer in cache.layers.values():
                    layer.cache.zero_()

    def release(self) -> None:
        """Drop everything that may live in the run's graph pool: the graph, its outputs, the
        tokenizer caches and the sampler's state (its multistep history of model outputs)."""
        self.graph = self.graph_outputs = None
        self.acoustic_cache = self.semantic_cache = None
        self.scheduler = None

    def _capture(self, like: tuple[torch.Tensor, torch.Tensor]) -> None:
        # The graph copies its results into buffers allocated here, outside the pool, whose
        # blocks the run's other graphs (the decoder layers') may reuse for temporaries.
        outputs = tuple(torch.empty_like(t) for t in like)

        def compute_into_outputs() -> None:
            for out, value in zip(outputs, self._compute()):
                out.copy_(value)

        captured = self.graphs.capture(compute_into_outputs)
        if captured is None:
            self.graphs = None  # an op that cannot be captured: stay eager
        else:
            self.graph, self.graph_outputs = captured[0], outputs

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        core = self.core
        latent = self._sample_latent()
        scaled = (latent / core.latent_scaling_factor - core.latent_bias_factor).permute(0, 2, 1)
        decoded = core.audio_tower.decoder(scaled, padding_cache=self.acoustic_cache, use_cache=True)
        self.acoustic_cache = decoded.padding_cache
        semantic = core.semantic_tokenizer_encoder(decoded.audio, padding_cache=self.semantic_cache, use_cache=True)
        self.semantic_cache = semantic.padding_cache
        next_embeds = core.multi_modal_projector(latent) + core.semantic_connector(semantic.latents)
        return decoded.audio[0, 0], next_embeds

    def _sample_latent(self) -> torch.Tensor:
        """Diffusion head sampling as transformers' `_sample_audio_latent`; at cfg 1 only the
        conditional row runs."""
        head = self.core.diffusion_head
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps=self.steps)  # resets the multistep state
        if self.condition.shape[0] == 1:
            latent = self.noise[:1]
            for i, t in enumerate(scheduler.timesteps):
                eps = head(latent, self.timesteps[i].repeat(1).to(latent), condition=self.condition)
                latent = scheduler.step(eps, t, latent).prev_sample
            return latent.unsqueeze(1)
        latent = self.noise
        for i, t in enumerate(scheduler.timesteps):
            combined = torch.cat([latent[:1], latent[:1]], dim=0)
            cond_eps, uncond_eps = head(combined, self.timesteps[i].repeat(2).to(combined), condition=self.condition).split(1, dim=0)
            guided = uncond_eps + self.cfg * (cond_eps - uncond_eps)
            latent = scheduler.step(torch.cat([guided, guided], dim=0), t, latent).prev_sample
        return latent[:1].unsqueeze(1)
