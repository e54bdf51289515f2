"""The audit grid: every cut undefended, then every defense at the deployed cut; three attacks each.

Rows, in order: one per cut in ``cuts`` with no defense ("more head blocks" is the row below the
deployed cut), then at ``defense_cut``: clipping alone, and clipping plus noise for each sigma.
Every row is attacked by all three attacks on the same victim texts; a fresh learned attacker is
trained for each row (it adapts to the cut and the defense). Every defense row also gets its
utility cost (a fine-tune through the defense), beside one undefended baseline fine-tune.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from shared.model.cut_defense import noise_generator
from shared.model.part_loading import load_config
from shared.model.models import resolve_model_dir
from shared.data.tokenizer import load_tokenizer
from splitfed.audit.attacks import (
    Defense,
    LearnedInverter,
    nearest_embedding_attack,
    optimization_attack,
)
from splitfed.audit.cut import HeadBlocks
from splitfed.audit.metrics import score_inversion
from splitfed.audit.texts import VICTIM_TOPICS, TokenWindows, shadow_windows, victim_windows
from splitfed.audit.utility import FinetuneSpec, finetune_cost

ATTACKS = ("learned", "optimization", "nearest")
# Default noise levels as noise-to-signal ratios: sigma = ratio * clip_norm / sqrt(hidden_size),
# i.e. the noise vector's expected norm is `ratio` times the clipped token's norm.
DEFAULT_NOISE_RATIOS = (0.25, 1.0, 4.0, 16.0)

Log = Callable[[str], None]


@dataclass(frozen=True)
class AuditConfig:
    model: str = "smollm2"
    victims: int = 16
    max_tokens: int = 48
    shadow: int = 768  # shadow windows of max_tokens tokens
    cuts: tuple[int, ...] = (0, 1, 2)
    defense_cut: int = 1
    clip_norm: float | None = None  # None: the median token norm of the shadow text at defense_cut
    sigmas: tuple[float, ...] | None = None  # None: DEFAULT_NOISE_RATIOS turned into sigmas
    learned_steps: int = 120
    optim_steps: int = 60
    optim_lr: float = 1.0
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    seed: int = 0


def _stack_cuts(head: HeadBlocks, windows: TokenWindows, k: int) -> torch.Tensor:
    return torch.cat([head.cut(i, m, k) for i, m in zip(windows.input_ids.split(64), windows.attention_mask.split(64))])


def _progress(log: Log, label: str, every: int) -> Callable[[int, int, float], None]:
    started = time.perf_counter()

    def on_step(step: int, steps: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            log(f"  {label}: step {step}/{steps}, loss {loss:.4f}, {time.perf_counter() - started:.0f} s")

    return on_step


def _prior_baseline(shadow: TokenWindows, victims: TokenWindows) -> float:
    """% of victim tokens an attacker gets by guessing the shadow text's most frequent token everywhere."""
    common = torch.mode(shadow.input_ids[shadow.attention_mask.bool()]).values
    real = victims.attention_mask.bool()
    return 100.0 * float((victims.input_ids[real] == common).sum()) / int(real.sum())


def _rows(cfg: AuditConfig, clip_norm: float, sigmas: tuple[float, ...], hidden: int) -> list[dict]:
    rows = [dict(label="embeddings only" if k == 0 else f"{k} head block{'s' if k > 1 else ''}",
                 cut=k, defense=Defense()) for k in cfg.cuts]
    blocks = f"{cfg.defense_cut} block{'s' if cfg.defense_cut > 1 else ''}"
    rows.append(dict(label=f"{blocks} + clip", cut=cfg.defense_cut, defense=Defense(clip_norm)))
    for sigma in sigmas:
        rows.append(dict(label=f"{blocks} + clip + noise {sigma:.3g}", cut=cfg.defense_cut,
                         defense=Defense(clip_norm, sigma)))
    for row in rows:
        d = row["defense"]
        row["noise_ratio"] = (d.sigma * math.sqrt(hidden) / d.clip_norm) if d.clip_norm and d.sigma else 0.0
    return rows


def run_audit(cfg: AuditConfig, log: Log) -> dict:
    started = time.perf_counter()
    model_dir = resolve_model_dir(cfg.model)
    n_layers = load_config(model_dir).num_hidden_layers
    deepest = max(*cfg.cuts, cfg.defense_cut)
    if deepest + 2 > n_layers:
        raise ValueError(f"a cut of {deepest} blocks leaves no trunk and tail in a {n_layers}-layer model")
    tokenizer = load_tokenizer(model_dir)
    head = HeadBlocks(model_dir, deepest)
    victims = victim_windows(tokenizer, cfg.victims, cfg.max_tokens, cfg.seed)
    shadow = shadow_windows(tokenizer, cfg.shadow, cfg.max_tokens, cfg.seed + 1)
    candidates = set(torch.unique(shadow.input_ids[shadow.attention_mask.bool()]).tolist())
    victim_tokens = victims.input_ids[victims.attention_mask.bool()].tolist()
    coverage = 100.0 * sum(t in candidates for t in victim_tokens) / len(victim_tokens)
    log(f"{cfg.model}: {len(victims.input_ids)} victim texts ({len(victim_tokens)} tokens), "
        f"{len(shadow.input_ids)} shadow windows; {coverage:.1f}% of victim tokens occur in the shadow text")

    clean = {k: (_stack_cuts(head, victims, k), _stack_cuts(head, shadow, k)) for k in sorted({*cfg.cuts, cfg.defense_cut})}
    real_norms = clean[cfg.defense_cut][1].norm(dim=-1)[shadow.attention_mask.bool()]
    clip_norm = cfg.clip_norm if cfg.clip_norm is not None else float(real_norms.median())
    hidden = head.hidden_size
    sigmas = cfg.sigmas if cfg.sigmas is not None else tuple(r * clip_norm / math.sqrt(hidden) for r in DEFAULT_NOISE_RATIOS)
    rows = _rows(cfg, clip_norm, sigmas, hidden)

    baseline = None
    if any(r["defense"].enabled for r in rows):
        log(f"utility baseline: fine-tune {cfg.finetune.steps} steps at cut {cfg.defense_cut}, no defense")
        baseline = finetune_cost(model_dir, cfg.defense_cut, Defense(), cfg.finetune,
                                 _progress(log, "fine-tune", max(1, cfg.finetune.steps // 4))).to_json()

    for i, row in enumerate(rows, 1):
        k, defense = row["cut"], row["defense"]
        log(f"[{i}/{len(rows)}] {row['label']}")
        victim_cut, shadow_cut = clean[k]
        observed = defense.apply(victim_cut, victims.attention_mask, noise_generator(cfg.seed, "victim", i))
        guesses = {
            "learned": LearnedInverter.train(shadow_cut, shadow.input_ids, shadow.attention_mask, head, defense,
                                             cfg.learned_steps, seed=cfg.seed,
                                             on_step=_progress(log, "learned", max(1, cfg.learned_steps // 3))
                                             )(observed, victims.attention_mask),
            "optimization": optimization_attack(observed, victims.attention_mask, head, k, defense, cfg.optim_steps,
                                                cfg.optim_lr, _progress(log, "optimization", max(1, cfg.optim_steps // 3))),
            "nearest": nearest_embedding_attack(observed, victims.attention_mask, head),
        }
        row["attacks"] = {name: score_inversion(tokenizer, guesses[name], victims.input_ids, victims.attention_mask
                                                ).to_json() for name in ATTACKS}
        row["example"] = {name: tokenizer.decode(guesses[name][0][victims.attention_mask[0].bool()].tolist())
                          for name in ATTACKS}
        log("  " + ", ".join(f"{n} {row['attacks'][n]['token_recovery']:.1f}%" for n in ATTACKS))
        if defense.enabled:
            row["utility"] = finetune_cost(model_dir, k, defense, cfg.finetune,
                                           _progress(log, "fine-tune", max(1, cfg.finetune.steps // 4))).to_json()
        elif baseline is not None and k >= 1:
            row["utility"] = dict(baseline, note="same computation as the baseline: only the split point moves")
        else:
            row["utility"] = None
        row["defense"] = {"clip_norm": defense.clip_norm, "sigma": defense.sigma}

    config = asdict(cfg)
    return {
        "audit": "invert",
        "model": cfg.model,
        "model_dir": str(model_dir),
        "hidden_size": hidden,
        "num_layers": n_layers,
        "config": config,
        "victims": {"texts": len(victims.input_ids), "tokens": len(victim_tokens), "topics": list(VICTIM_TOPICS),
                    "max_tokens": cfg.max_tokens, "first_text": tokenizer.decode(
                        victims.input_ids[0][victims.attention_mask[0].bool()].tolist())},
        "shadow": {"windows": len(shadow.input_ids), "candidate_tokens": len(candidates),
                   "victim_token_coverage": round(coverage, 2)},
        "clip_norm": clip_norm,
        "clip_norm_source": "given" if cfg.clip_norm is not None else f"median token norm at cut {cfg.defense_cut}",
        "prior_baseline_recovery": round(_prior_baseline(shadow, victims), 2),
        "utility_baseline": baseline,
        "rows": rows,
        "wall_s": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }

