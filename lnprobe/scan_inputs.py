"""What a scan feeds a model, and what each position of each residual stream holds.

A checkpoint declares its input (`model.main_input_name`), and its directory holds the matching
preprocessor:

- `input_ids` (text): a tokenizer; the text is cut into sequences by `text_ids`. A position holds a
  token: its id and the tokenizer's string.
- `pixel_values` (images, ViT-like): an image processor; the images are files (`--image FILE`) or
  deterministic generated ones (`synthetic_images`). A position holds an image patch: token id −1,
  token `"patch k"` (k = row × patches per row + column, counted from the top left); positions
  before the patches (the stream is longer than image_size² / patch_size²) hold `"[CLS]"` (the
  first) and `"[special k]"`.
- `input_features` (audio, Whisper-like): a feature extractor; the audio is WAV files (`--audio
  FILE`) or deterministic generated waveforms (`synthetic_waveforms`). An encoder position holds an
  audio frame: token id −1, token `"frame k"` (the k-th encoder position; Whisper's encoder halves the
  feature frames, so frame k covers 2 × hop_length samples from 2k × hop_length). The decoder of an
  audio encoder–decoder gets its start token only (`config.decoder_start_token_id`), so its positions
  hold tokens.

An encoder–decoder given text gets the same ids as decoder input, so both stacks see the same tokens.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["ScanInputs", "build_inputs", "load_audio", "load_images", "synthetic_images",
           "synthetic_waveforms", "text_ids"]

DEFAULT_SEQUENCES = 8
DEFAULT_SEQ_LEN = 128
SYNTHETIC_IMAGE_SIZE = 256     # pixels per side before the image processor resizes
SYNTHETIC_AUDIO_SECONDS = 4.0  # seconds per generated waveform (the feature extractor pads or cuts)
NO_TOKEN = -1                  # token_id of a position that holds an image patch or an audio frame


# ----------------------------------------------------------------------------- text


def default_text(max_bytes: int = 1 << 20) -> str:
    """The built-in corpus (the standard library's source files, `lnprobe.data.stdlib_corpus`)."""
    from .data import stdlib_corpus

    return stdlib_corpus(max_bytes).decode("utf-8", errors="replace")


def text_ids(tokenizer: Any, text: str | None = None, *, sequences: int = DEFAULT_SEQUENCES,
             seq_len: int = DEFAULT_SEQ_LEN) -> torch.Tensor:
    """(N, T) token ids: `text` (default: the built-in corpus) tokenised without special tokens,
    cut into N consecutive chunks, each with the tokenizer's special tokens added, T in all."""
    text = default_text() if text is None else text
    prefix, suffix = _special_template(tokenizer)
    n_special = len(prefix) + len(suffix)
    body = seq_len - n_special
    if body < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room beside {n_special} special tokens")
    # tokenise only as much text as needed (a generous byte budget per token), then widen if short
    budget = max(4096, 16 * sequences * body)
    while True:
        ids = tokenizer(text[:budget], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= sequences * body or budget >= len(text):
            break
        budget *= 4
    if len(ids) < sequences * body:
        raise ValueError(f"the text has {len(ids)} tokens; {sequences} sequences of {body} need "
                         f"{sequences * body}: pass a longer text or fewer/shorter sequences")
    rows = [prefix + list(ids[i * body:(i + 1) * body]) + suffix for i in range(sequences)]
    return torch.tensor(rows, dtype=torch.long)


def _special_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the text that the tokenizer adds as special tokens, read off one
    sample encoded with and without them (tokenizers differ in how they expose the template)."""
    sample = "a b c"
    bare = list(tokenizer(sample, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(sample, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def token_strings(tokenizer: Any) -> Callable[[int], str]:
    """id -> the tokenizer's string for it (cached); the id itself without a tokenizer or where the
    tokenizer has no string for it (a tokenizer built without a vocabulary file)."""
    if tokenizer is None:
        return str
    cache: dict[int, str] = {}

    def lookup(i: int) -> str:
        if i not in cache:
            tok = tokenizer.convert_ids_to_tokens(int(i))
            cache[i] = str(i) if tok is None else str(tok)
        return cache[i]

    return lookup


# ----------------------------------------------------------------------------- images and audio


def synthetic_images(n: int, size: int = SYNTHETIC_IMAGE_SIZE) -> list:
    """`n` deterministic RGB images (PIL) of `size` × `size`: image k is a colour gradient with three
    filled rectangles and a disc, all drawn from numpy's generator seeded with k."""
    from PIL import Image

    images = []
    yy, xx = np.mgrid[0:size, 0:size] / size                           # (S, S) each, in [0, 1)
    for k in range(n):
        rng = np.random.default_rng(k)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = c0 * (1 - xx[..., None]) + c1 * yy[..., None]            # (S, S, 3)
        for _ in range(3):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            w, h = rng.integers(size // 8, size // 3, 2)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
        images.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
    return images


def load_images(paths: Sequence[str | Path]) -> list:
    """The image files at `paths` as RGB PIL images (any format Pillow reads)."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(img.convert("RGB"))
    return out


def synthetic_waveforms(n: int, rate: int, seconds: float = SYNTHETIC_AUDIO_SECONDS) -> list[np.ndarray]:
    """`n` deterministic mono waveforms (float32 in [-1, 1]) at `rate` Hz: waveform k is a chirp
    from 200 to 2000 Hz plus two harmonics of a tone and weak noise, parameters from numpy's
    generator seeded with k."""
    t = np.arange(int(seconds * rate)) / rate                          # (S,)
    out = []
    for k in range(n):
        rng = np.random.default_rng(k)
        f0 = rng.uniform(100, 400)
        chirp = np.sin(2 * np.pi * (200 * t + (1800 / (2 * seconds)) * t ** 2))
        tone = np.sin(2 * np.pi * f0 * t) + 0.5 * np.sin(2 * np.pi * 2 * f0 * t)
        wave = 0.4 * chirp + 0.3 * tone + 0.05 * rng.standard_normal(t.shape)
        out.append((wave / np.abs(wave).max() * 0.9).astype(np.float32))
    return out


def load_audio(path: str | Path, rate: int) -> np.ndarray:
    """The WAV file at `path` as a mono float32 waveform at `rate` Hz (channels averaged, integer
    PCM scaled to [-1, 1], resampled with scipy's polyphase filter when its rate differs)."""
    from math import gcd

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    file_rate, data = wavfile.read(str(path))
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        data = (data.astype(np.float64) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 2:
        data = data.mean(1)
    if file_rate != rate:
        g = gcd(int(file_rate), int(rate))
        data = resample_poly(data, rate // g, file_rate // g)
    return data.astype(np.float32)


# ----------------------------------------------------------------------------- inputs of a scan


@dataclass
class ScanInputs:
    """The N items a scan runs (sequences of tokens, images or waveforms), as model keyword inputs
    per batch, and what each position of each residual stream holds.

    kind: "text", "image" or "audio". streams: "main" (the model's declared input; the encoder of an
    encoder–decoder) and, when the decoder gets its own ids, "decoder": (N, T) token ids or None for
    positions that are patches or frames."""

    kind: str
    n: int
    batch: Callable[[int, int], dict]          # (lo, hi) -> keyword inputs of items lo..hi-1 (CPU)
    ids: dict[str, torch.Tensor | None]        # stream -> (N, T) token ids, None: patches / frames
    lookup: Callable[[int], str] = str         # token id -> string
    n_patches: int | None = None               # images: patches per image, when the config tells
    lengths: dict[str, int] = field(default_factory=dict)  # stream -> T, as the scan saw it
    extra: dict = field(default_factory=dict)  # what the inputs were made from (for meta.json)

    def label(self, stream: str, seq: int, pos: int) -> tuple[int, str]:
        """(token_id, token) at position `pos` of item `seq` of `stream`."""
        ids = self.ids.get(stream)
        if ids is not None:
            tid = int(ids[seq, pos])
            return tid, self.lookup(tid)
        if self.kind == "image":
            length = self.lengths.get(stream, 0)
            n_special = length - self.n_patches if self.n_patches and length > self.n_patches else 0
            if pos < n_special:
                return NO_TOKEN, "[CLS]" if pos == 0 else f"[special {pos}]"
            return NO_TOKEN, f"patch {pos - n_special}"
        return NO_TOKEN, f"frame {pos}"


def _call_kwargs(model: nn.Module, kwargs: dict) -> dict:
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def build_inputs(model: nn.Module, source: Any, *, text: str | None = None, images: Sequence | None = None,
                 audio: Sequence | None = None, sequences: int = DEFAULT_SEQUENCES,
                 seq_len: int = DEFAULT_SEQ_LEN, tokenizer: Any = None) -> ScanInputs:
    """The inputs of a scan of `model` from `source`: an (N, T) tensor of token ids, a tokenizer, an
    image processor or a feature extractor (which one the model needs follows from its
    `main_input_name`). images: PIL images or image files (default `sequences` synthetic ones);
    audio: waveforms at the extractor's rate or WAV files (default `sequences` synthetic ones).
    tokenizer: names the token ids (of a tensor `source`, or an audio decoder's)."""
    cfg = getattr(model, "config", None)
    name = getattr(model, "main_input_name", "input_ids")
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    given = [what for what, value, needs in (("text", text, "input_ids"), ("images", images, "pixel_values"),
                                             ("audio", audio, "input_features")) if value is not None and needs != name]
    if given:
        raise ValueError(f"{given[0]} given, but {type(model).__name__} declares the input '{name}' (token ids: "
                         f"text; pixel_values: images; input_features: audio)")
    if isinstance(source, torch.Tensor) or name == "input_ids":
        if isinstance(source, torch.Tensor):
            ids = source.long()
            ids = ids[None] if ids.dim() == 1 else ids
        else:
            tokenizer = source
            ids = text_ids(tokenizer, text, sequences=sequences, seq_len=seq_len)

        def text_batch(lo: int, hi: int) -> dict:
            b = ids[lo:hi]
            kw: dict[str, Any] = {"input_ids": b}
            params = inspect.signature(model.forward).parameters
            if "attention_mask" in params:
                kw["attention_mask"] = torch.ones_like(b)
            if enc_dec and "decoder_input_ids" in params:
                kw["decoder_input_ids"] = b
            return _call_kwargs(model, kw)

        return ScanInputs("text", ids.shape[0], text_batch, {"main": ids}, token_strings(tokenizer))

    if name == "pixel_values":
        items = synthetic_images(sequences) if images is None else [
            load_images([i])[0] if isinstance(i, (str, Path)) else i for i in images]
        pixels = source(images=items, return_tensors="pt")["pixel_values"]     # (N, C, H, W)
        size = getattr(cfg, "image_size", None)
        patch = getattr(cfg, "patch_size", None)
        n_patches = (int(size) // int(patch)) ** 2 if isinstance(size, int) and isinstance(patch, int) else None

        def image_batch(lo: int, hi: int) -> dict:
            return _call_kwargs(model, {"pixel_values": pixels[lo:hi].to(model_dtype(model))})

        made = "synthetic" if images is None else [str(i) if isinstance(i, (str, Path)) else "image" for i in images]
        return ScanInputs("image", len(items), image_batch, {"main": None}, n_patches=n_patches,
                          extra={"images": made})

    if name == "input_features":
        rate = int(getattr(source, "sampling_rate", 16000))
        waves = synthetic_waveforms(sequences, rate) if audio is None else [
            load_audio(a, rate) if isinstance(a, (str, Path)) else np.asarray(a, dtype=np.float32) for a in audio]
        feats = source(waves, sampling_rate=rate, return_tensors="pt")["input_features"]  # (N, mel, frames)
        dec = None
        if enc_dec:
            start = getattr(cfg, "decoder_start_token_id", None)
            if not isinstance(start, int):
                raise ValueError(f"{type(model).__name__} is an encoder–decoder without "
                                 f"config.decoder_start_token_id: the decoder has no input to scan")
            dec = torch.full((len(waves), 1), start, dtype=torch.long)          # (N, 1)

        def audio_batch(lo: int, hi: int) -> dict:
            kw: dict[str, Any] = {"input_features": feats[lo:hi].to(model_dtype(model))}
            if dec is not None:
                kw["decoder_input_ids"] = dec[lo:hi]
            return _call_kwargs(model, kw)

        made = "synthetic" if audio is None else [str(a) if isinstance(a, (str, Path)) else "waveform" for a in audio]
        streams: dict[str, torch.Tensor | None] = {"main": None}
        if dec is not None:
            streams["decoder"] = dec
        return ScanInputs("audio", len(waves), audio_batch, streams, token_strings(tokenizer),
                          extra={"audio": made, "sampling_rate": rate})
    raise ValueError(f"{type(model).__name__} declares the input '{name}'; a scan runs token ids "
                     f"(input_ids), images (pixel_values) or audio features (input_features)")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
