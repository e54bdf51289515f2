"""One role's memory in a process of its own (run by `splitfed bench memory`; prints one JSON line).

The silo builds head + tail and runs a step the way the silo agent does (head forward, the cut
detached as if sent, tail forward and loss, backward through the tail, the cut gradient pushed back
through the head, AdamW over the LoRA weights); the trunk builds its blocks and runs forward and
backward on a random cut activation and gradient. Nothing else is loaded, so the peak resident set
minus the one after imports is the role's model, activations and optimizer.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024  # kB


def _anon_mb() -> float:
    # RssAnon: the part of the resident set that is this process's own. The rest (RssFile) is pages of
    # the memory-mapped checkpoint, which the page cache shares between processes and can drop.
    return _status_mb("RssAnon")


def _peak_mb() -> float:
    # VmHWM, the high-water mark of this address space: ru_maxrss would not do, Linux carries the
    # pre-exec RSS of the forking parent into it (measured: every child read the parent's 1158 MB).
    return _status_mb("VmHWM")


def _holdings(parts, facts) -> dict:
    """What the parts hold, by what it is: the embedding, numbered blocks, final norm, LM head."""
    blocks, other = set(), set()
    for part in parts:
        for name, _ in part.named_parameters():
            if ".lora_" in name:
                continue
            if name.startswith(facts.layers + "."):
                blocks.add(int(name[len(facts.layers) + 1:].split(".")[0]))
            else:
                other.add(name.rsplit(".", 1)[0])
    return {"blocks": sorted(blocks), "modules": sorted(other)}


def _total_params(config) -> int:
    """The unsplit model's parameter count (tied weights once), from a skeleton on meta: no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from shared.model.families import facts_for

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p for p in model.parameters()}
    head = model.get_submodule(facts_for(config).lm_head).weight
    if config.tie_word_embeddings and id(head) in unique and head is not model.get_input_embeddings().weight:
        del unique[id(head)]  # measured: on meta the tie is not made, but the checkpoint stores it once
    return sum(p.numel() for p in unique.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--role", choices=["silo", "trunk"], required=True)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], required=True)
    ap.add_argument("--head-layers", type=int, default=2)
    ap.add_argument("--tail-layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--trunk-quant", choices=["none", "nf4", "int8"], default="none")
    args = ap.parse_args()

    import torch

    from shared.model.adapters import AdapterConfig, apply_adapter, unique_parameters
    from shared.model.loss import causal_lm_loss
    from shared.model.part_loading import build_part, build_silo_parts, load_config
    from shared.model.model_split import positions_from_mask
    from shared.model.optim import make_optimizer
    from shared.model.quantize import block_quantizer, release_freed_heap, weight_bytes

    torch.set_num_threads(max(1, torch.get_num_threads()))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    baseline, baseline_anon = _rss_mb(), _anon_mb()
    model_dir = Path(args.model_dir)
    config = load_config(model_dir)
    cfg = AdapterConfig()
    kw = dict(head_layers=args.head_layers, tail_layers=args.tail_layers, dtype=dtype)
    if args.role == "silo":
        head, tail = build_silo_parts(model_dir, **kw)
        parts = [head, tail]
        trainable = unique_parameters(apply_adapter(head, cfg, 0), apply_adapter(tail, cfg, 0))
    else:
        trunk = build_part(model_dir, "trunk", **kw, on_layer_loaded=block_quantizer(args.trunk_quant, dtype,
                                                                                     torch.device("cpu")))
        parts = [trunk]
        if args.trunk_quant != "none":
            release_freed_heap()  # as the trunk worker does
        trainable = apply_adapter(trunk, cfg, 0)
    frozen = {id(p): p for part in parts for p in part.parameters() if not p.requires_grad}.values()
    params = sum(p.numel() for p in frozen)
    param_bytes = weight_bytes(*parts) - sum(p.numel() * p.element_size() for p in trainable)
    loaded, loaded_anon = _rss_mb(), _anon_mb()
    load_peak = _peak_mb()

    optimizer = make_optimizer(trainable, 1e-4, 0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    positions = positions_from_mask(mask)
    if args.role == "silo":
        cut = head(ids, mask, positions)
        sent = cut.detach().requires_grad_(True)  # what the trunk would return has this shape
        loss = causal_lm_loss(tail(sent, mask, positions), ids)
        loss.backward()
        cut.backward(sent.grad)
    else:
        cut = torch.randn(args.batch, args.seq, config.hidden_size, generator=g).to(dtype).requires_grad_(True)
        out = trunk(cut, mask, positions)
        out.backward(torch.randn(out.shape, generator=g).to(dtype))
    optimizer.step()
    print(json.dumps({
        "role": args.role, "dtype": args.dtype, "trunk_quant": args.trunk_quant if args.role == "trunk" else None,
        "params": params, "param_mb": round(param_bytes / 2**20, 1),
        "trainable_params": sum(p.numel() for p in trainable),
        "baseline_rss_mb": round(baseline, 1), "loaded_rss_mb": round(loaded, 1),
        "load_peak_rss_mb": round(load_peak, 1), "peak_rss_mb": round(_peak_mb(), 1),
        "baseline_anon_mb": round(baseline_anon, 1), "loaded_anon_mb": round(loaded_anon, 1), "after_step_anon_mb": round(_anon_mb(), 1),
        "after_step_file_mb": round(_status_mb("RssFile"), 1),
        "loaded_minus_baseline_vs_param_bytes": round((loaded - baseline) / max(param_bytes / 2**20, 1e-9), 3),
        "holds": _holdings(parts, parts[0].facts),
        "model_params_total": _total_params(config),
    }))


if __name__ == "__main__":
    main()
