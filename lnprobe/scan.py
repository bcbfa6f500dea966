"""Scan trained or pretrained checkpoints: one eval-mode forward over fixed inputs, recorded as a run.

`scan_model(model, source, out)` runs the model in eval mode without gradients on N items (sequences
of T tokens, images, or waveforms; `lnprobe.scan_inputs`) and writes to `out`:

- a run directory (`lnprobe.load_run(out)`): one step per model scanned, every site and statistic
  (`record="all"`, so eval-mode forwards are recorded); an encoder–decoder's two stacks together
  (meta.json `map.stacks`);
- `tokens.parquet`: step, checkpoint, stack (null for a model with one stack), sequence, position,
  token_id, token: what each position holds — the tokenizer's string for a token; for an image
  patch (token_id −1) "patch k" or "[CLS]", for an audio frame (token_id −1) "frame k"; one row
  per position of each stack;
- `massive.csv`: every element of the residual stream `resid` (layer l = input of block l, layer L
  the output of the last block) that is a massive activation by Sun et al. (2024): |x| > 100 and
  |x| ≥ 1000 × the median of |x| over that layer's whole tensor (all sequences, positions and
  channels; the exact median). Columns: step, checkpoint, layer, sequence, position, token_id,
  token (as in tokens.parquet, of the stack holding the layer), channel, value (signed), ratio
  (|value| / median);
- `report/`: the figures and report.html of `analysis.scan_report`.

`scan(paths, out)` loads each Hugging Face checkpoint directory (model and its tokenizer, image
processor or feature extractor, local files only) and scans them into one run directory, step k =
the k-th path.

The text is split into sequences the way the model saw text in training: the whole text is
tokenised once without special tokens, cut into consecutive chunks, and each chunk gets the
tokenizer's special tokens (BERT's [CLS] … [SEP], Llama's BOS), so that position 0 holds the
token on which massive activations are known to sit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .constants import MASSIVE_ABS, MASSIVE_RATIO
from .scan_inputs import DEFAULT_SEQ_LEN, DEFAULT_SEQUENCES, ScanInputs, build_inputs, text_ids

__all__ = ["DEFAULT_SEQUENCES", "DEFAULT_SEQ_LEN", "ScanResult", "load_checkpoint", "scan", "scan_model",
           "text_ids"]

# |x| values kept per layer for the exact median; above this the median is that of a strided sample
_MEDIAN_ELEMENTS = 1 << 24
MASSIVE_COLUMNS = ["step", "checkpoint", "layer", "sequence", "position", "token_id", "token",
                   "channel", "value", "ratio"]


@dataclass
class ScanResult:
    """What `scan_model` wrote: the run directory and the two tables (also on disk)."""

    path: Path
    tokens: pd.DataFrame
    massive: pd.DataFrame
    maps: dict = field(default_factory=dict)  # step -> (layer, sequence, (T, D) |x| array)


# ----------------------------------------------------------------------------- capture


class _ResidCapture:
    """Forward hooks that keep, per resid layer, the candidates |x| > 100 (sequence, position,
    channel, value), a sample of |x| for the median, the |x| map of the sequence holding the
    layer's largest |x|, and the layer's sequence length T. Tensors are (B, T, D), or (B·T, D)
    flattened, with B the batch now running."""

    def __init__(self) -> None:
        self.batch = 1      # B of the batch now running
        self.offset = 0     # sequence index of the batch's first row
        self.cands: dict[int, list[np.ndarray]] = {}
        self.samples: dict[int, list[torch.Tensor]] = {}
        self.best: dict[int, tuple[float, int, np.ndarray]] = {}
        self.lengths: dict[int, int] = {}

    def take(self, layer: int, x: torch.Tensor) -> None:
        b = self.batch
        t = x.shape[1] if x.dim() == 3 else x.numel() // (b * x.shape[-1])
        self.lengths[layer] = int(t)
        a = x.detach().float().reshape(b, t, -1).abs()                 # (B, T, D)
        flat = a.reshape(-1)
        stride = max(1, flat.numel() * 8 // _MEDIAN_ELEMENTS)
        self.samples.setdefault(layer, []).append(flat[::stride].cpu())
        idx = torch.nonzero(a > MASSIVE_ABS)  # (k, 3): sequence, position, channel
        if idx.numel():
            vals = x.detach().float().reshape(b, t, -1)[idx[:, 0], idx[:, 1], idx[:, 2]]
            rows = torch.cat([idx.double(), vals.double()[:, None]], 1).cpu().numpy()
            rows[:, 0] += self.offset
            self.cands.setdefault(layer, []).append(rows)
        top = float(a.max())
        if layer not in self.best or top > self.best[layer][0]:
            seq = int(a.amax(dim=(1, 2)).argmax())
            self.best[layer] = (top, self.offset + seq, a[seq].cpu().numpy())

    def median(self, layer: int) -> float:
        return float(torch.cat(self.samples[layer]).median())


def _register_capture(probe: Any, cap: _ResidCapture) -> list:
    modules = dict(probe.model.named_modules())
    handles = []
    for (site, layer), point in probe.map.site_points().items():
        if site != "resid":
            continue

        def grab(point=point, layer=layer):
            def pre(module, args, kwargs):
                x = point.fetch(args, kwargs)
                if x is not None:
                    cap.take(layer, x)

            def post(module, args, kwargs, output):
                x = point.fetch(args, kwargs, output)
                if x is not None:
                    cap.take(layer, x)
            return pre, post

        pre, post = grab()
        module = modules[point.module]
        if point.kind == "in":
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(post, with_kwargs=True))
    return handles


# ----------------------------------------------------------------------------- scan


def _stream_of_layer(probe: Any, inputs: ScanInputs) -> Callable[[int], tuple[str | None, str]]:
    """layer -> (stack name or None, the inputs' stream its positions hold): a decoder layer holds the
    decoder's own ids when it has them; layer L (the last block's output) is the last stack's."""
    stacks = probe.map.stacks

    def of(layer: int) -> tuple[str | None, str]:
        if not stacks:
            return None, "main"
        st = next((s for s in stacks if s.first_layer <= layer < s.first_layer + s.n_layers), stacks[-1])
        return st.name, "decoder" if st.name == "decoder" and "decoder" in inputs.ids else "main"

    return of


def scan_model(model: nn.Module, source: Any, out: str | Path, *, text: str | None = None,
               images: Sequence | None = None, audio: Sequence | None = None,
               sequences: int = DEFAULT_SEQUENCES, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 8,
               step: int = 0, checkpoint: str | None = None, report: bool = True,
               tokenizer: Any = None, config: dict | None = None, **attach_kwargs: Any) -> ScanResult:
    """Scan `model` (see the module docstring) into the run directory `out`.

    source: what the model's declared input is made from (`lnprobe.scan_inputs.build_inputs`): a
    Hugging Face tokenizer (the text is tokenised by `text_ids`), an (N, T) tensor of token ids (then
    `tokenizer`, if given, names the tokens; else the id is its string), an image processor (with
    `images`: PIL images or files; default `sequences` generated ones) or a feature extractor (with
    `audio`: waveforms or WAV files; default `sequences` generated ones).
    step: the step number of this model (0 starts a new run in `out`; k > 0 appends step k).
    checkpoint: the name stored with the step (default: the model's class). report: build
    `out/report/` after the step. Other keywords go to `lnprobe.attach`."""
    import lnprobe

    out = Path(out)
    inputs = build_inputs(model, source, text=text, images=images, audio=audio, sequences=sequences,
                          seq_len=seq_len, tokenizer=tokenizer)
    name = checkpoint or type(model).__name__
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters())).device
    main_ids = inputs.ids["main"]
    scan_cfg: dict[str, Any] = {"input": inputs.kind, "sequences": int(inputs.n), **inputs.extra}
    if main_ids is not None:
        scan_cfg["seq_len"] = int(main_ids.shape[1])
    cfg = dict(config or {}, scan=scan_cfg)
    attach_kwargs.setdefault("sites", "all")
    attach_kwargs.setdefault("stats", "all")
    attach_kwargs.setdefault("grad_sites", None)
    if "example_input" not in attach_kwargs:
        first = inputs.batch(0, 1)
        if main_ids is not None:  # eight tokens are enough to map a text model
            first = {k: v[:, :8] if k in ("input_ids", "attention_mask", "decoder_input_ids") else v
                     for k, v in first.items()}
        attach_kwargs["example_input"] = _to(first, device)
    probe = lnprobe.attach(model, out, record="all", resume=step if step else False, config=cfg,
                           **attach_kwargs)
    cap = _ResidCapture()
    handles = _register_capture(probe, cap)
    try:
        with torch.no_grad():
            for lo in range(0, inputs.n, batch_size):
                batch = _to(inputs.batch(lo, min(lo + batch_size, inputs.n)), device)
                cap.batch, cap.offset = min(batch_size, inputs.n - lo), lo
                model(**batch)
        probe.step()
    finally:
        for h in handles:
            h.remove()
        probe.close()
        model.train(was_training)

    of_layer = _stream_of_layer(probe, inputs)
    for layer, length in sorted(cap.lengths.items(), reverse=True):  # a stack's first layer wins
        inputs.lengths[of_layer(layer)[1]] = length
    tokens = _token_rows(inputs, probe, cap, of_layer, step, name)
    massive = _massive_rows(cap, inputs, of_layer, step, name)
    maps = {step: {layer: (seq, m) for layer, (_, seq, m) in cap.best.items()}}
    _write_tables(out, tokens, massive, append=step > 0)
    _write_maps(out, step, cap, inputs, of_layer)
    result = ScanResult(out, tokens, massive, maps)
    if report:
        from .analysis.scan_report import build_scan_report

        build_scan_report(out)
    return result


def _to(kwargs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _token_rows(inputs: ScanInputs, probe: Any, cap: _ResidCapture, of_layer: Callable, step: int,
                name: str) -> pd.DataFrame:
    """tokens.parquet's rows: every position of every item, per stack (stack null for one stack)."""
    stacks = [(s.name, s.first_layer) for s in probe.map.stacks] or [(None, 0)]
    frames = []
    for stack, first in stacks:
        stream = of_layer(first)[1]
        length = inputs.lengths.get(stream, 0)
        seq, pos = np.repeat(np.arange(inputs.n), length), np.tile(np.arange(length), inputs.n)
        labels = [inputs.label(stream, int(s), int(p)) for s, p in zip(seq, pos)]
        frames.append(pd.DataFrame({
            "step": step, "checkpoint": name, "stack": stack, "sequence": seq, "position": pos,
            "token_id": np.array([tid for tid, _ in labels], dtype=np.int64),
            "token": [tok for _, tok in labels]}))
    return pd.concat(frames, ignore_index=True)


def _massive_rows(cap: _ResidCapture, inputs: ScanInputs, of_layer: Callable, step: int,
                  name: str) -> pd.DataFrame:
    rows = []
    for layer in sorted(cap.samples):
        med = cap.median(layer)
        stream = of_layer(layer)[1]
        for part in cap.cands.get(layer, []):
            for seq, pos, ch, val in part:
                if abs(val) >= MASSIVE_RATIO * med:
                    tid, tok = inputs.label(stream, int(seq), int(pos))
                    rows.append((step, name, layer, int(seq), int(pos), tid, tok, int(ch),
                                 float(val), abs(val) / med if med > 0 else float("inf")))
    return pd.DataFrame(rows, columns=MASSIVE_COLUMNS)


def _write_tables(out: Path, tokens: pd.DataFrame, massive: pd.DataFrame, append: bool) -> None:
    tok_path, mas_path = out / "tokens.parquet", out / "massive.csv"
    if append and tok_path.exists():
        tokens = pd.concat([pd.read_parquet(tok_path), tokens], ignore_index=True)
    if append and mas_path.exists():
        old = pd.read_csv(mas_path, keep_default_na=False)
        massive = pd.concat([old, massive], ignore_index=True) if len(old) else massive
    tokens.to_parquet(tok_path, index=False)
    massive.to_csv(mas_path, index=False)


def _write_maps(out: Path, step: int, cap: _ResidCapture, inputs: ScanInputs, of_layer: Callable) -> None:
    """`maps/step-K.npz`: the |x| map (T, D) of the layer with the largest |x| of this step, for the
    sequence holding it, with its layer, sequence and what its positions hold (read by the report)."""
    if not cap.best:
        return
    layer = max(cap.best, key=lambda k: cap.best[k][0])
    _, seq, amap = cap.best[layer]
    stream = of_layer(layer)[1]
    (out / "maps").mkdir(exist_ok=True)
    labels = [inputs.label(stream, seq, p)[1] for p in range(amap.shape[0])]
    np.savez_compressed(out / "maps" / f"step-{step:06d}.npz", map=amap.astype(np.float32),
                        layer=layer, sequence=seq, tokens=np.array(labels, dtype=object).astype(str))


def load_checkpoint(path: str | Path, *, dtype: str | None = None, device: str = "cpu"
                    ) -> tuple[nn.Module, Any, Any]:
    """(model, preprocessor, tokenizer) of a Hugging Face checkpoint directory, local files only.
    The model is the bare `AutoModel` (hidden states are what a scan reads; a head is not needed);
    the preprocessor is what its declared input needs: the tokenizer (`input_ids`), the image
    processor (`pixel_values`) or the feature extractor (`input_features`); the tokenizer names the
    decoder's tokens of an audio model (None when the directory has none)."""
    import transformers

    kw: dict[str, Any] = {"local_files_only": True}
    if dtype:
        kw["dtype"] = getattr(torch, dtype)
    model = transformers.AutoModel.from_pretrained(str(path), **kw).to(device)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        return model, transformers.AutoImageProcessor.from_pretrained(str(path), local_files_only=True), None
    if name == "input_features":
        extractor = transformers.AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError):  # no tokenizer files: decoder tokens are named by id
            tokenizer = None
        return model, extractor, tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer, tokenizer


def scan(paths: Sequence[str | Path], out: str | Path, *, text: str | None = None,
         images: Sequence[str | Path] | None = None, audio: Sequence[str | Path] | None = None,
         sequences: int = DEFAULT_SEQUENCES, seq_len: int = DEFAULT_SEQ_LEN, dtype: str | None = None,
         device: str = "cpu", batch_size: int = 8) -> ScanResult:
    """Scan each checkpoint directory in `paths` into `out`, step k = paths[k], on the same inputs
    for all (text: the token ids of the first checkpoint's tokenizer; images and audio: the same
    files or generated items, through each checkpoint's own preprocessor), then build `out/report/`."""
    if not paths:
        raise ValueError("scan needs at least one checkpoint directory")
    ids, result = None, None
    names = [str(p) for p in paths]
    for k, path in enumerate(paths):
        model, source, tokenizer = load_checkpoint(path, dtype=dtype, device=device)
        given = text  # refused by scan_model when the model does not read text
        if getattr(model, "main_input_name", "input_ids") == "input_ids":
            if ids is None:
                ids = text_ids(source, text, sequences=sequences, seq_len=seq_len)
            source, given = ids, None
        result = scan_model(model, source, out, text=given, images=images, audio=audio, sequences=sequences,
                            step=k, checkpoint=str(path), tokenizer=tokenizer, batch_size=batch_size,
                            report=k == len(paths) - 1, config={"checkpoints": names})
        del model
    (Path(out) / "checkpoints.json").write_text(json.dumps(names, indent=1))
    return result
