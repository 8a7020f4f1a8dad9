"""Scripts, the exact prompt text, voice-clip preparation and the local tokenizer search."""

import math

import numpy as np
import pytest
import torch

from vibevoice_offload.audio import TARGET_DBFS, prepare_voice
from vibevoice_offload.config import SAMPLE_RATE
from vibevoice_offload.errors import ScriptError, TokenizerNotFoundError
from vibevoice_offload.pipeline import VibeVoice
from vibevoice_offload.prompt import SYSTEM_PROMPT, build_prompt, parse_script
from vibevoice_offload.synthetic import write_tokenizer
from vibevoice_offload.tokenizer import find_tokenizer_dir, tokenizer_search_path


def test_script_forms_and_blank_lines():
    lines = parse_script("\nSpeaker 1: Hello there.\n\n[2]: Hi!\n  speaker 3 :  Third  \n")
    assert [(l.speaker, l.text) for l in lines] == [(1, "Hello there."), (2, "Hi!"), (3, "Third")]


@pytest.mark.parametrize(
    "script,message",
    [
        ("", "script is empty"),
        ("\n\n  \n", "script is empty"),
        ("Speaker 1: ok\nNarrator: nope", "line 2 is not"),
        ("Speaker 1:   ", "line 1 \\(speaker 1\\) has no text"),
        ("\n".join(f"Speaker {i}: x" for i in range(1, 6)), "5 speakers"),
    ],
)
def test_bad_scripts_name_the_line(script, message):
    with pytest.raises(ScriptError, match=message):
        parse_script(script)


def test_prompt_is_the_exact_text_of_the_original(tiny_model_dir, two_voices):
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    config = vv.checkpoint.config
    prompt = build_prompt(vv.tokenizer, config, "Speaker 1: Hello there.\nSpeaker 2: Hi!", two_voices)
    ids = prompt.input_ids[0].tolist()
    start, end, frame = config.audio_bos_token_id, config.audio_eos_token_id, config.audio_token_id
    # 40 samples at hop 4 -> 10 frames; 30 samples at 16 kHz -> 45 at 24 kHz -> 12 frames.
    assert ids.count(frame) == 10 + 12
    text = vv.tokenizer.decode([i for i in ids if i not in (start, end, frame)])
    assert text == (
        SYSTEM_PROMPT
        + " Voice input:\n Speaker 0:\n Speaker 1:\n"
        + " Text input:\n Speaker 0: Hello there.\n Speaker 1: Hi!\n Speech output:\n"
    )
    assert ids[-1] == start
    assert prompt.voice_values.shape == (2, 1, 48) and prompt.voice_mask.sum(dim=1).tolist() == [40, 45]
    assert prompt.voice_values.shape[-1] % 4 == 0


def test_speaker_ids_start_at_zero_stay(tiny_model_dir, two_voices):
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    voices = {0: two_voices[1], 1: two_voices[2]}
    prompt = build_prompt(vv.tokenizer, vv.checkpoint.config, "Speaker 0: a\nSpeaker 1: b", voices)
    assert " Speaker 0: a\n Speaker 1: b\n" in vv.tokenizer.decode(prompt.input_ids[0])


def test_a_speaker_without_a_voice_is_named(tiny_model_dir, two_voices):
    vv = VibeVoice.load(tiny_model_dir, dtype="fp32")
    with pytest.raises(ScriptError, match="no voice clip for speaker\\(s\\) 3"):
        build_prompt(vv.tokenizer, vv.checkpoint.config, "Speaker 1: a\nSpeaker 3: b", two_voices)


def test_voice_is_resampled_downmixed_and_normalised():
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 220 * t), 0.5 * np.sin(2 * np.pi * 220 * t)]).astype(np.float32)
    clip = prepare_voice(torch.from_numpy(stereo)[None], 44100, speaker="speaker 1", hop=3200)
    assert clip.ndim == 1 and abs(clip.size - SAMPLE_RATE) <= 1
    dbfs = 20 * math.log10(float(np.sqrt(np.mean(clip.astype(np.float64) ** 2))))
    assert dbfs == pytest.approx(TARGET_DBFS, abs=0.05)
    loud = np.ones(4000, dtype=np.float32) * 0.9
    loud[::2] = -0.9
    loud[:10] = 50.0  # a spike: normalisation must not clip
    assert np.abs(prepare_voice(loud, 24000, speaker="s", hop=4)).max() <= 1.0


@pytest.mark.parametrize(
    "audio,rate,message",
    [
        (np.zeros(24000, dtype=np.float32), 24000, "speaker 2 is silent"),
        (np.array([0.1, np.nan] * 3000, dtype=np.float32), 24000, "speaker 2 contains NaN"),
        (np.array([0.1, np.inf] * 3000, dtype=np.float32), 24000, "speaker 2 contains NaN or infinite"),
        (np.random.default_rng(0).standard_normal(1000).astype(np.float32), 16000, "speaker 2 is too short"),
        (np.zeros((1, 1, 0), dtype=np.float32), 24000, "speaker 2 is empty"),
    ],
)
def test_bad_voice_clips_name_the_speaker(audio, rate, message):
    with pytest.raises(ScriptError, match=message):
        prepare_voice(audio, rate, speaker="speaker 2", hop=3200)


def test_tokenizer_search_order_and_error(tmp_path):
    model = tmp_path / "models" / "VibeVoice-Large"
    model.mkdir(parents=True)
    fallback = write_tokenizer(tmp_path / "comfy_bundled")
    assert find_tokenizer_dir(model, [fallback]) == fallback
    beside = write_tokenizer(tmp_path / "models" / "tokenizer")
    assert find_tokenizer_dir(model, [fallback]) == beside
    write_tokenizer(model)
    assert find_tokenizer_dir(model, [fallback]) == model
    empty = tmp_path / "other" / "m"
    empty.mkdir(parents=True)
    with pytest.raises(TokenizerNotFoundError) as error:
        find_tokenizer_dir(empty, [tmp_path / "nowhere"])
    for place in tokenizer_search_path(empty, [tmp_path / "nowhere"]):
        assert str(place) in str(error.value)
