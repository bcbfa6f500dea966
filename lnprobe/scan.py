"""Scan trained or pretrained checkpoints: one eval-mode forward over a fixed text, recorded as a run.

`scan_model(model, tokenizer_or_ids, out)` runs the model in eval mode without gradients on N
sequences of T tokens and writes to `out`:

- a run directory (`lnprobe.load_run(out)`): one step per model scanned, every site and statistic
  (`record="all"`, so eval-mode forwards are recorded);
- `tokens.parquet`: sequence, position, token_id, token (the tokenizer's string for the id);
- `massive.csv`: every element of the residual stream `resid` (layer l = input of block l, layer L
  the output of the last block) that is a massive activation by Sun et al. (2024): |x| > 100 and
  |x| ≥ 1000 × the median of |x| over that layer's whole tensor (all sequences, positions and
  channels; the exact median). Columns: step, checkpoint, layer, sequence, position, token_id,
  token, channel, value (signed), ratio (|value| / median);
- `report/`: the figures and report.html of `analysis.scan_report`.

`scan(paths, out)` loads each Hugging Face checkpoint directory (model and tokenizer, local files
only) and scans them into one run directory, step k = the k-th path.

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

__all__ = ["DEFAULT_SEQUENCES", "DEFAULT_SEQ_LEN", "ScanResult", "scan", "scan_model", "text_ids"]

DEFAULT_SEQUENCES = 8
DEFAULT_SEQ_LEN = 128
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


def _token_strings(tokenizer: Any, ids: torch.Tensor) -> Callable[[int], str]:
    if tokenizer is None:
        return str
    cache: dict[int, str] = {}

    def lookup(i: int) -> str:
        if i not in cache:
            cache[i] = str(tokenizer.convert_ids_to_tokens(int(i)))
        return cache[i]

    return lookup


# ----------------------------------------------------------------------------- capture


class _ResidCapture:
    """Forward hooks that keep, per resid layer, the candidates |x| > 100 (sequence, position,
    channel, value), a sample of |x| for the median, and the |x| map of the sequence holding the
    layer's largest |x|. Tensors are expected as (B, T, D) (or flattened (B·T, D))."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape  # (B, T) of the batch now running
        self.offset = 0     # sequence index of the batch's first row
        self.cands: dict[int, list[np.ndarray]] = {}
        self.samples: dict[int, list[torch.Tensor]] = {}
        self.best: dict[int, tuple[float, int, np.ndarray]] = {}

    def take(self, layer: int, x: torch.Tensor) -> None:
        b, t = self.shape
        a = x.detach().float().reshape(b, t, -1).abs()
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


def _model_inputs(model: nn.Module, ids: torch.Tensor, device: torch.device) -> dict:
    ids = ids.to(device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    import inspect

    params = inspect.signature(model.forward).parameters
    if "attention_mask" in params:
        kwargs["attention_mask"] = torch.ones_like(ids)
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def scan_model(model: nn.Module, tokenizer_or_ids: Any, out: str | Path, *, text: str | None = None,
               sequences: int = DEFAULT_SEQUENCES, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 8,
               step: int = 0, checkpoint: str | None = None, report: bool = True,
               tokenizer: Any = None, config: dict | None = None, **attach_kwargs: Any) -> ScanResult:
    """Scan `model` (see the module docstring) into the run directory `out`.

    tokenizer_or_ids: a Hugging Face tokenizer (the text is tokenised by `text_ids`) or an (N, T)
    tensor of token ids (then `tokenizer`, if given, names the tokens; else the id is its string).
    step: the step number of this model (0 starts a new run in `out`; k > 0 appends step k).
    checkpoint: the name stored with the step (default: the model's class). report: build
    `out/report/` after the step. Other keywords go to `lnprobe.attach`."""
    import lnprobe

    out = Path(out)
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.long()
        if ids.dim() == 1:
            ids = ids[None]
    else:
        tokenizer = tokenizer_or_ids
        ids = text_ids(tokenizer, text, sequences=sequences, seq_len=seq_len)
    name = checkpoint or type(model).__name__
    lookup = _token_strings(tokenizer, ids)
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters())).device
    n, t = ids.shape
    cfg = dict(config or {}, scan={"sequences": int(n), "seq_len": int(t)})
    attach_kwargs.setdefault("sites", "all")
    attach_kwargs.setdefault("stats", "all")
    attach_kwargs.setdefault("grad_sites", None)
    attach_kwargs.setdefault("example_input", _model_inputs(model, ids[:1, : min(t, 8)], device))
    probe = lnprobe.attach(model, out, record="all", resume=step if step else False, config=cfg,
                           **attach_kwargs)
    cap = _ResidCapture((1, t))
    handles = _register_capture(probe, cap)
    try:
        with torch.no_grad():
            for lo in range(0, n, batch_size):
                batch = ids[lo:lo + batch_size]
                cap.shape, cap.offset = tuple(batch.shape), lo
                model(**_model_inputs(model, batch, device))
        probe.step()
    finally:
        for h in handles:
            h.remove()
        probe.close()
        model.train(was_training)

    tokens = pd.DataFrame({
        "step": step, "checkpoint": name,
        "sequence": np.repeat(np.arange(n), t), "position": np.tile(np.arange(t), n),
        "token_id": ids.reshape(-1).numpy(),
    })
    tokens["token"] = [lookup(i) for i in tokens.token_id]
    massive = _massive_rows(cap, ids, lookup, step, name)
    maps = {step: {layer: (seq, m) for layer, (_, seq, m) in cap.best.items()}}
    _write_tables(out, tokens, massive, append=step > 0)
    _write_maps(out, step, cap, ids, lookup)
    result = ScanResult(out, tokens, massive, maps)
    if report:
        from .analysis.scan_report import build_scan_report

        build_scan_report(out)
    return result


def _massive_rows(cap: _ResidCapture, ids: torch.Tensor, lookup: Callable, step: int, name: str) -> pd.DataFrame:
    rows = []
    for layer in sorted(cap.samples):
        med = cap.median(layer)
        for part in cap.cands.get(layer, []):
            for seq, pos, ch, val in part:
                if abs(val) >= MASSIVE_RATIO * med:
                    tid = int(ids[int(seq), int(pos)])
                    rows.append((step, name, layer, int(seq), int(pos), tid, lookup(tid), int(ch),
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


def _write_maps(out: Path, step: int, cap: _ResidCapture, ids: torch.Tensor, lookup: Callable) -> None:
    """`maps/step-K.npz`: the |x| map (T, D) of the layer with the largest |x| of this step, for the
    sequence holding it, with its layer, sequence and token strings (read by the report)."""
    if not cap.best:
        return
    layer = max(cap.best, key=lambda k: cap.best[k][0])
    _, seq, amap = cap.best[layer]
    (out / "maps").mkdir(exist_ok=True)
    np.savez_compressed(out / "maps" / f"step-{step:06d}.npz", map=amap.astype(np.float32),
                        layer=layer, sequence=seq,
                        tokens=np.array([lookup(int(i)) for i in ids[seq]], dtype=object).astype(str))


def load_checkpoint(path: str | Path, *, dtype: str | None = None, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a Hugging Face checkpoint directory, local files only. The model is
    the bare `AutoModel` (hidden states are what a scan reads; a causal LM's head is not needed)."""
    import transformers

    kw: dict[str, Any] = {"local_files_only": True}
    if dtype:
        kw["dtype"] = getattr(torch, dtype)
    model = transformers.AutoModel.from_pretrained(str(path), **kw).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


def scan(paths: Sequence[str | Path], out: str | Path, *, text: str | None = None,
         sequences: int = DEFAULT_SEQUENCES, seq_len: int = DEFAULT_SEQ_LEN, dtype: str | None = None,
         device: str = "cpu", batch_size: int = 8) -> ScanResult:
    """Scan each checkpoint directory in `paths` into `out`, step k = paths[k], with the same token
    ids for all (tokenised by the first checkpoint's tokenizer), then build `out/report/`."""
    if not paths:
        raise ValueError("scan needs at least one checkpoint directory")
    ids, result = None, None
    names = [str(p) for p in paths]
    for k, path in enumerate(paths):
        model, tokenizer = load_checkpoint(path, dtype=dtype, device=device)
        if ids is None:
            ids = text_ids(tokenizer, text, sequences=sequences, seq_len=seq_len)
        result = scan_model(model, ids, out, step=k, checkpoint=str(path), tokenizer=tokenizer,
                            batch_size=batch_size, report=k == len(paths) - 1,
                            config={"checkpoints": names})
        del model
    (Path(out) / "checkpoints.json").write_text(json.dumps(names, indent=1))
    return result
