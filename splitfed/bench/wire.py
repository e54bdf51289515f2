"""`splitfed bench wire`: bytes per training step on the wire, and what compression costs, per wire format.

For each model: one real training step of the split model (LoRA, BBC demo articles, batch B, up to
T tokens) with the four wire crossings made explicit, as in the roles: h1 (silo -> trunk), h2
(trunk -> silo), dL/dh2 (silo -> trunk), dL/dh1 (trunk -> silo). Per wire format:

* ``bytes_per_step``: the four messages as ``SealedCodec`` sends them (every frame: headers, values,
  scales, mask, positions, the applied counter, AEAD tags), and the ratio to fp32;
* ``error``: per crossing tensor, ||x - wire(x)|| / ||x|| and max|x - wire(x)| / max|x|;
* ``step``: the same step with every crossing going through the format: the loss and the
  trainable gradient (all LoRA tensors of head, trunk and tail) against fp32's (difference,
  cosine, relative L2).

Plus ``shape_7b``: bytes per step of a 7B-shaped step (B=4, T=512, H=4096; random values) per format.
Sizes only; no timing. In one process, no sockets (the byte counts are those of the frames).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from shared.crypto.sealed_codec import SealedCodec
from shared.data.dataset import Example, SiloDataset
from shared.data.tokenizer import load_tokenizer
from shared.model.adapters import AdapterConfig, apply_adapter
from shared.model.loss import causal_lm_loss
from shared.model.part_loading import build_part, build_silo_parts
from shared.model.model_split import positions_from_mask
from shared.model.models import resolve_model_dir
from shared.wire.compression import AUTO_FORMATS, SCHEMES, WIRE_FORMATS, dequantize, quantize, quantize_best
from shared.wire.protocol import WIRE_DTYPE_BY_NAME, Kind
from shared.wire.wire import Message
from splitfed.bench.crypto import session_pair
from splitfed.experiment.bbc import demo_examples

CROSSINGS = ("h1", "h2", "dL/dh2", "dL/dh1")
SHAPE_7B = (4, 512, 4096)


def through_wire(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """What the receiver gets for ``x`` under ``fmt`` (in fp32)."""
    if fmt in SCHEMES:
        return dequantize(*quantize(x, SCHEMES[fmt]))
    if fmt in AUTO_FORMATS:
        return dequantize(*quantize_best(x, AUTO_FORMATS[fmt]))
    return x.to(WIRE_DTYPE_BY_NAME[fmt]).to(x.dtype)


def step_messages(h1, mask, pos, h2, dh2, dh1, fmt: str) -> list[Message]:
    cast = WIRE_DTYPE_BY_NAME[fmt]  # what the roles cast to before their codec encodes
    run, silo = "bench", "bench"
    return [Message(Kind.FORWARD, run, silo, 0, 0, tensors=[h1.to(cast), mask.to(torch.uint8), pos.to(torch.int32)]),
            Message(Kind.FORWARD_RESULT, run, silo, 0, 0, tensors=[h2.to(cast)]),
            Message(Kind.BACKWARD, run, silo, 0, 0, tensors=[dh2.to(cast)]),
            Message(Kind.BACKWARD_RESULT, run, silo, 0, 0, tensors=[dh1.to(cast), torch.tensor([1], dtype=torch.int64)])]


def bytes_on_wire(messages: list[Message], fmt: str) -> dict:
    """Bytes of each message's frames as a sealed codec sends them (silo and trunk sides alike)."""
    silo, _ = session_pair(silo_id="bench", run_id="bench")
    codec = SealedCodec(1 << 30, fmt)
    codec.sessions.add(silo)
    sizes = {m.kind.name: sum(memoryview(f).nbytes for f in codec.encode(m)) for m in messages}
    return {"bytes_per_step": sum(sizes.values()), "per_message": sizes}


class SplitStep:
    """Head, trunk and tail of a model with fresh LoRA adapters; one step with explicit crossings."""

    def __init__(self, model_dir: Path, seed: int) -> None:
        cfg = AdapterConfig(kind="lora")  # as the runs train it: B = 0, so the first gradients are B's
        self.head, self.tail = build_silo_parts(model_dir)
        self.trunk = build_part(model_dir, "trunk")
        self.params = [*apply_adapter(self.head, cfg, seed), *apply_adapter(self.trunk, cfg, seed),
                       *apply_adapter(self.tail, cfg, seed)]

    def run(self, ids, mask, pos, labels, fmt: str) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, flat gradient, the four crossing tensors as sent) with every crossing through ``fmt``."""
        for p in self.params:
            p.grad = None
        sent = {}
        h1 = self.head(ids, mask, pos)
        sent["h1"] = h1.detach()
        h1_in = through_wire(sent["h1"], fmt).requires_grad_()
        h2 = self.trunk(h1_in, mask, pos)
        sent["h2"] = h2.detach()
        h2_in = through_wire(sent["h2"], fmt).requires_grad_()
        loss = causal_lm_loss(self.tail(h2_in, mask, pos), labels)
        loss.backward()
        sent["dL/dh2"] = h2_in.grad.detach()
        h2.backward(through_wire(sent["dL/dh2"], fmt))
        sent["dL/dh1"] = h1_in.grad.detach()
        h1.backward(through_wire(sent["dL/dh1"], fmt))
        grad = torch.cat([p.grad.reshape(-1) for p in self.params if p.grad is not None])
        return float(loss.detach()), grad, sent


def _error(x: torch.Tensor, fmt: str) -> dict:
    diff = (x - through_wire(x, fmt)).float()
    return {"rel_l2": float(diff.norm() / x.float().norm().clamp_min(1e-30)),
            "max_abs_rel": float(diff.abs().max() / x.float().abs().max().clamp_min(1e-30))}


def bench_model(model: str, formats: list[str], batch_size: int, max_length: int, seed: int) -> dict:
    model_dir = resolve_model_dir(model)
    torch.manual_seed(seed)
    data = SiloDataset([Example(r.get("prompt", ""), r.get("completion", r.get("text", ""))) for r in demo_examples()],
                       load_tokenizer(model_dir), batch_size, max_length, seed, 0)
    batch = data.batch(0)
    mask, labels = batch.attention_mask, batch.labels
    pos = positions_from_mask(mask)
    step = SplitStep(model_dir, seed)
    ref_loss, ref_grad, sent = step.run(batch.input_ids, mask, pos, labels, "fp32")
    b, t, h = sent["h1"].shape
    out = {"model": model, "batch_size": b, "tokens": t, "hidden": h, "formats": {}}
    fp32_bytes = None
    for fmt in formats:
        loss, grad, _ = step.run(batch.input_ids, mask, pos, labels, fmt)
        sizes = bytes_on_wire(step_messages(sent["h1"], mask, pos, sent["h2"], sent["dL/dh2"], sent["dL/dh1"], fmt), fmt)
        fp32_bytes = fp32_bytes or bytes_on_wire(
            step_messages(sent["h1"], mask, pos, sent["h2"], sent["dL/dh2"], sent["dL/dh1"], "fp32"), "fp32")["bytes_per_step"]
        cos = float(torch.nn.functional.cosine_similarity(grad.double(), ref_grad.double(), dim=0))
        out["formats"][fmt] = {
            **sizes, "ratio_to_fp32": round(sizes["bytes_per_step"] / fp32_bytes, 4),
            "error": {name: _error(sent[name], fmt) for name in CROSSINGS},
            "step": {"loss": loss, "loss_diff": loss - ref_loss, "grad_cosine": cos,
                     "grad_rel_l2": float((grad - ref_grad).norm() / ref_grad.norm())},
        }
        click.echo(f"[bench wire] {model} {fmt}: {sizes['bytes_per_step']} B/step "
                   f"({out['formats'][fmt]['ratio_to_fp32']:.4f} of fp32), loss diff {loss - ref_loss:+.2e}, "
                   f"grad cosine {cos:.6f}", err=True)
    return out


def bench_shape(shape: tuple[int, int, int], formats: list[str]) -> dict:
    b, t, h = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, h, generator=g)
    mask = torch.ones(b, t, dtype=torch.uint8)
    pos = torch.arange(t, dtype=torch.int32).expand(b, t).contiguous()
    fp32 = bytes_on_wire(step_messages(x, mask, pos, x, x, x, "fp32"), "fp32")["bytes_per_step"]
    rows = {}
    for fmt in formats:
        n = bytes_on_wire(step_messages(x, mask, pos, x, x, x, fmt), fmt)["bytes_per_step"]
        rows[fmt] = {"bytes_per_step": n, "MiB_per_step": round(n / 2**20, 2), "ratio_to_fp32": round(n / fp32, 4)}
    return {"batch_size": b, "tokens": t, "hidden": h, "formats": rows}


@click.command("wire")
@click.option("--models", default="tiny-256,smollm2", show_default=True, help="comma-separated: tiny, tiny-256, smollm2, a path")
@click.option("--formats", default=",".join(WIRE_FORMATS), show_default=True, help="comma-separated wire formats")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-length", type=click.IntRange(8), default=128, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--json", "json_path", default="-", show_default=True, help="output file ('-' = stdout)")
def wire(models: str, formats: str, batch_size: int, max_length: int, seed: int, json_path: str) -> None:
    """Bytes per step on the wire and compression error (per crossing tensor and on one step's gradient)."""
    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    if not fmts or any(f not in WIRE_FORMATS for f in fmts):
        raise click.BadParameter(f"comma-separated, of {', '.join(WIRE_FORMATS)}", param_hint="--formats")
    if "fp32" not in fmts:
        fmts.insert(0, "fp32")
    started = time.perf_counter()
    doc = {"benchmark": "wire", "formats": fmts, "seed": seed,
           "models": [bench_model(m.strip(), fmts, batch_size, max_length, seed) for m in models.split(",") if m.strip()],
           "shape_7b": bench_shape(SHAPE_7B, fmts)}
    doc["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(doc, indent=1)
    if json_path and json_path != "-":
        Path(json_path).write_text(text)
        click.echo(f"wrote {json_path}", err=True)
    else:
        click.echo(text)
