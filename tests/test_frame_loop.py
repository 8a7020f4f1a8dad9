"""Our frame loop against transformers' own `generate`, and its one-pass-per-layer order."""

import pytest
import torch
from transformers.generation import UnbatchedClassifierFreeGuidanceLogitsProcessor

from vibevoice_offload.executor import ResidentExecutor
from vibevoice_offload.frame_loop import GenerationSettings
from vibevoice_offload.speech_frame import make_scheduler
from vibevoice_offload.pipeline import VibeVoice
from vibevoice_offload.prompt import build_prompt

SCRIPT = "Speaker 1: Hello there.\nSpeaker 2: Hi!"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return VibeVoice.load(tiny_model_dir, dtype="fp32")


def reference_audio(vv: VibeVoice, voices, cfg: float, steps: int, frames: int, seed: int) -> torch.Tensor:
    """transformers' generate on the same prompt; at cfg != 1 without its extra logits-CFG
    processor (a third LLM pass that the original model does not have)."""
    prompt = build_prompt(vv.tokenizer, vv.checkpoint.config, SCRIPT, voices)
    model = vv.model
    stock = model._get_logits_processor

    def without_logits_cfg(*args, **kwargs):
        processors = stock(*args, **kwargs)
        return type(processors)(p for p in processors if not isinstance(p, UnbatchedClassifierFreeGuidanceLogitsProcessor))

    model._get_logits_processor = without_logits_cfg
    try:
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids),
            input_values=prompt.voice_values, padding_mask=prompt.voice_mask,
            max_new_tokens=frames, guidance_scale=cfg, num_diffusion_steps=steps,
            noise_scheduler=make_scheduler(), return_dict_in_generate=True,
        )
    finally:
        del model._get_logits_processor
    return out.audio[0].flatten()


@pytest.mark.parametrize("cfg", [1.0, 1.3])
def test_waveform_equals_transformers_generate(tiny, two_voices, cfg):
    ours = tiny.generate(SCRIPT, two_voices, GenerationSettings(cfg=cfg, steps=5, seed=7, max_frames=10)).waveform
    reference = reference_audio(tiny, two_voices, cfg, steps=5, frames=10, seed=7)
    assert ours.shape == reference.shape == (10 * 4,)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_the_logits_cfg_processor_is_what_differs(tiny, two_voices):
    """Sanity of the reference: stock generate at cfg 1.3 runs a third pass; our frames still match
    the processor-free run above, so the processor removal is the only adjustment."""
    calls = []
    layer = tiny.model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        reference_audio(tiny, two_voices, 1.3, steps=2, frames=3, seed=1)
        passes_without_processor = len(calls)
        calls.clear()
        prompt = build_prompt(tiny.tokenizer, tiny.checkpoint.config, SCRIPT, two_voices)
        torch.manual_seed(1)
        tiny.model.generate(input_ids=prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids),
                            input_values=prompt.voice_values, padding_mask=prompt.voice_mask, max_new_tokens=3,
                            guidance_scale=1.3, num_diffusion_steps=2, noise_scheduler=make_scheduler())
    finally:
        handle.remove()
    assert len(calls) > passes_without_processor


class CountingExecutor(ResidentExecutor):
    """Records every decoder-layer fetch and every layer forward, per frame."""

    def __init__(self, model):
        super().__init__(model)
        self.events: list[tuple[str, int]] = []
        for index, layer in enumerate(model.model.language_model.layers):
            # the batch size tells a pass of one branch from a pass of both
            layer.register_forward_pre_hook(lambda module, args, index=index: self.events.append(("forward", index, args[0].shape[0])))

    def decoder_layer(self, index):
        self.events.append(("fetch", index))
        return super().decoder_layer(index)

    def decoder_layer_done(self, index):
        self.events.append(("done", index))


@pytest.mark.parametrize("cfg,branches", [(1.3, 2), (1.0, 1)])
def test_each_layer_is_fetched_once_per_frame_for_both_branches(tiny_model_dir, two_voices, cfg, branches):
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    executor = CountingExecutor(vv.model)
    frames = 5
    result = vv.generate(SCRIPT, two_voices, GenerationSettings(cfg=cfg, steps=2, max_frames=frames), executor=executor)
    layers = vv.checkpoint.config.text_config.num_hidden_layers
    assert result.stats["frames"] == frames
    prompt_pass, step = [], []
    for i in range(layers):
        prompt_pass += [("fetch", i)] + [("forward", i, 1)] * branches + [("done", i)]  # the prompts differ in length
        step += [("fetch", i), ("forward", i, branches), ("done", i)]  # one batch of both branches
    # prefill + one pass per later frame (the last frame's token came from the previous pass)
    assert executor.events == prompt_pass + step * (frames - 1)


def test_callback_sees_every_frame_and_can_stop(tiny, two_voices):
    seen = []

    def on_frame(frame, total, chunk):
        seen.append((frame, total, chunk.numel()))
        return frame < 3

    result = tiny.generate(SCRIPT, two_voices, GenerationSettings(steps=2, max_frames=8), on_frame=on_frame)
    assert seen == [(1, 8, 4), (2, 8, 4), (3, 8, 4)]
    assert result.stats["stopped"] == "callback" and result.waveform.numel() == 12


def test_caps_default_seconds_and_frames(tiny, two_voices):
    settings = GenerationSettings(steps=1, max_seconds=7 * 4 / 24000)
    assert tiny.generate(SCRIPT, two_voices, settings).stats["frames"] == 7
    prompt = build_prompt(tiny.tokenizer, tiny.checkpoint.config, SCRIPT, two_voices)
    assert GenerationSettings().frame_cap(prompt.length, 4) == prompt.length  # twice the prompt in all


def test_end_token_stops_and_stats_are_reported(tiny_model_dir, two_voices):
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    with torch.no_grad():  # the end token now outscores the frame token
        vv.model.lm_head.weight[vv.checkpoint.config.eos_token_id, 0] = 100.0
    result = vv.generate(SCRIPT, two_voices, GenerationSettings(steps=2, max_frames=50))
    stats = result.stats
    assert stats["frames"] == 0 and stats["tokens"] == 1 and stats["stopped"] == "end"
    assert result.waveform.numel() == 0


def test_stats_are_reported(tiny, two_voices):
    result = tiny.generate(SCRIPT, two_voices, GenerationSettings(steps=2, max_frames=4))
    stats = result.stats
    assert stats["frames"] == 4 and stats["tokens"] == 4 and stats["stopped"] == "cap"
    assert result.sample_rate == 24000 and stats["audio_seconds"] == pytest.approx(16 / 24000)
    assert stats["ms_per_frame"] > 0 and stats["rtf"] == pytest.approx(stats["ms_per_frame"] / (4 / 24))


def test_same_seed_same_audio_other_seed_other_audio(tiny, two_voices):
    def run(seed):
        return tiny.generate(SCRIPT, two_voices, GenerationSettings(steps=2, seed=seed, max_frames=4)).waveform

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.std() > 0


@pytest.mark.parametrize("bad,message", [(dict(steps=0), "steps"), (dict(cfg=0.5), "cfg")])
def test_bad_settings(tiny, two_voices, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate(SCRIPT, two_voices, GenerationSettings(max_frames=2, **bad))


def _speech_inputs(config, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = config.text_config.hidden_size
    return torch.randn(2, config.audio_config.hidden_size, generator=g), torch.randn(1, hidden, generator=g), torch.randn(1, hidden, generator=g)


def test_tokenizer_reset_in_place_equals_fresh_caches(tiny):
    """A speech segment's end zeroes the streaming caches in place (a captured graph keeps
    their addresses): the next frame must equal a first frame on fresh caches."""
    from vibevoice_offload.speech_frame import SpeechFrame

    model, cpu = tiny.model, torch.device("cpu")
    ongoing = SpeechFrame(model, cpu, torch.float32, steps=3, cfg=1.3, graphs=None)
    with torch.inference_mode():
        for seed in (1, 2, 3):
            previous_audio = ongoing(*_speech_inputs(model.config, seed))[0].clone()
        assert ongoing.acoustic_cache.layers and ongoing.semantic_cache.layers
        continued = ongoing(*_speech_inputs(model.config, 4))[0].clone()
        ongoing.reset_tokenizers()
        after_reset = [t.clone() for t in ongoing(*_speech_inputs(model.config, 4))]
        fresh = SpeechFrame(model, cpu, torch.float32, steps=3, cfg=1.3, graphs=None)(*_speech_inputs(model.config, 4))
    assert not torch.equal(continued, after_reset[0])  # the caches did carry context
    assert all(torch.equal(a, b) for a, b in zip(after_reset, fresh))
    assert previous_audio.shape == continued.shape


@pytest.mark.parametrize("bucket", [8, 256])
def test_batched_step_equals_one_branch_at_a_time(tiny, monkeypatch, bucket):
    """A step runs both branches as one batch over the static cache rows (masked views that
    grow by `bucket` positions); it must equal running each branch on its own over its
    filled prefix, through an undone step and a hidden prefix of the negative branch."""
    from vibevoice_offload import decoder_pass
    from vibevoice_offload.decoder_pass import BranchCache, DecoderPass

    monkeypatch.setattr(decoder_pass, "VIEW_BUCKET", bucket)
    lm, text = tiny.model.model.language_model, tiny.model.config.text_config
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, n, text.hidden_size, generator=g) for n in (11, 1)]
    tokens = [torch.randn(1, 1, text.hidden_size, generator=g) for _ in range(12)]
    passes = []
    with torch.inference_mode():
        for batched in (True, False):
            cache = BranchCache(text, 2, 40, torch.device("cpu"), torch.float32)
            decoder = DecoderPass(lm, ResidentExecutor(tiny.model), cache, graphs=None)
            outputs = [decoder.run_rows([(0, prompts[0]), (1, prompts[1])])]
            for i, token in enumerate(tokens):
                if batched:
                    outputs.append(decoder.step(token))
                else:
                    outputs.append(torch.cat([decoder.run_rows([(row, token)]) for row in (0, 1)]))
                if i == 3:
                    cache.undo_last(1)
                if i == 6:
                    cache.undo_last(1)
                    cache.hide_before_now(1)
            passes.append((outputs, list(cache.lengths), cache.device_lengths.tolist(), cache.device_visible_from.tolist()))
    (batched, *state_b), (single, *state_s) = passes
    assert state_b == state_s == [[23, 11], [23, 11], [0, 6]]
    for a, b in zip(batched, single):
        assert a.shape == (2, text.hidden_size)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[-1][1], batched[-2][1])  # the steps did move the branch


def test_a_full_branch_cache_is_refused(tiny):
    from vibevoice_offload.decoder_pass import BranchCache, DecoderPass

    lm, text = tiny.model.model.language_model, tiny.model.config.text_config
    cache = BranchCache(text, 1, 3, torch.device("cpu"), torch.float32)
    decoder = DecoderPass(lm, ResidentExecutor(tiny.model), cache, graphs=None)
    token = torch.zeros(1, 1, text.hidden_size)
    with torch.inference_mode():
        decoder.run_rows([(0, torch.zeros(1, cache.capacity - 1, text.hidden_size))])
        decoder.step(token)
        with pytest.raises(RuntimeError, match="KV cache is full"):
            decoder.step(token)


def test_layers_with_hooks_are_not_captured(tiny):
    """A graph replay skips Python hooks, so a hooked layer (a patch, an adapter, our counting
    executor) must run eagerly."""
    from vibevoice_offload.decoder_pass import _has_hooks

    layer = tiny.model.model.language_model.layers[0]
    assert not _has_hooks(layer)
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda module, args: None)
    try:
        assert _has_hooks(layer)
    finally:
        handle.remove()
    assert not _has_hooks(layer)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert _has_hooks(layer)
    finally:
        handle.remove()
