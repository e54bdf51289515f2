"""`splitfed audit defend`: each defense attacked by an attacker RETRAINED against the trained, defended head.

`audit invert` attacks the public base weights. A deployed silo fine-tunes its head (LoRA) and,
with the learned defense, a privacy adapter; an attacker who gets those trained weights (a leaked
checkpoint, a colluding silo of the same secure-aggregation group, or an operator who later serves
the model) pushes its shadow text through exactly that defended head and trains its inverter on the
result. That is the attacker assumed here, the strongest short of knowing the noise draws:

* knows: the silo's trained head (base weights + LoRA + privacy adapter), the cut, the clip norm and
  sigma, the defense's algorithm; public shadow text of other topics;
* does not know: the silo's text, the noise draws (the silo's secret seed), the silo's own inverter.

Each row fine-tunes the split model with its defense (same steps, data, seed: utility), then runs:
(a') the learned attacker retrained on the defended head, (a) the learned attacker of `audit
invert` trained on the PUBLIC head (an attacker who knows only the base weights and the defense's
clip/noise settings, not the trained adapter), (b) optimization through the defended head, (c)
nearest embedding. Rows: no defense at each cut of ``cuts`` (one fine-tune: the split point does
not change what trains), clip + noise at ``defense_cut`` for each sigma, the learned defense
for each strength at each of ``learned_cuts``, and the rank-k bottleneck (privacy_bottleneck.py,
trained the same way; lambda 0 allowed: the bottleneck without its adversary) for each of
``bottleneck_strengths`` x ``bottleneck_ranks`` at each of ``learned_cuts``. The retrained attacker
(a') holds a bottlenecked head exactly as an adapted one: D and U are part of its TrainedHead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from shared.data.tokenizer import load_tokenizer
from shared.model.cut_defense import noise_generator
from shared.model.part_loading import load_config
from shared.model.models import resolve_model_dir
from shared.model.privacy_adapter import PrivacyAdapterConfig
from splitfed.audit.attacks import Defense, LearnedInverter, nearest_embedding_attack, optimization_attack
from splitfed.audit.cut import HeadBlocks, TrainedHead
from splitfed.audit.metrics import score_inversion
from splitfed.audit.runner import _progress, _stack_cuts
from splitfed.audit.texts import TokenWindows, shadow_windows, victim_windows
from splitfed.audit.utility import FinetuneSpec, finetune

DEFEND_ATTACKS = ("retrained", "public", "optimization", "nearest")
Log = Callable[[str], None]


@dataclass(frozen=True)
class DefendConfig:
    model: str = "smollm2"
    victims: int = 16
    max_tokens: int = 48
    shadow: int = 768
    cuts: tuple[int, ...] = (1, 2, 4)  # undefended rows
    defense_cut: int = 1  # where the noise rows are
    sigmas: tuple[float, ...] = (0.5, 2.0)  # clip + noise rows
    strengths: tuple[float, ...] = (0.1, 0.3, 1.0)  # learned-defense rows (lambda)
    learned_cuts: tuple[int, ...] = (1,)
    learned_sigma: float = 0.0  # noise after the privacy adapter (clipped first when > 0)
    rank: int = 32
    bottleneck_ranks: tuple[int, ...] = ()  # rank-k bottleneck rows (k < hidden size)
    bottleneck_strengths: tuple[float, ...] = (1.0,)  # their lambdas (>= 0)
    inverter_steps: int = 2
    inverter_lr: float = 1e-3
    adapter_lr: float = 1e-2
    warmup_steps: int = 0
    distortion: float = 1.0
    clip_norm: float | None = None  # None: the median token norm of the shadow text at each cut
    learned_steps: int = 120
    optim_steps: int = 60
    optim_lr: float = 1.0
    public_attack: bool = True  # also attacker (a) on learned rows: shows what retraining adds
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    seed: int = 0


def _label(k: int) -> str:
    return f"{k} block{'s' if k > 1 else ''}"


def plan_rows(cfg: DefendConfig) -> list[dict]:
    """The rows to run, in order (labels, cuts and defense settings; no clip norms yet)."""
    bottlenecks = cfg.bottleneck_ranks and cfg.bottleneck_strengths
    if not (cfg.cuts or cfg.sigmas or cfg.strengths or bottlenecks):
        raise ValueError("nothing to run: no cuts, sigmas, strengths or bottleneck ranks")
    if any(not s > 0 for s in cfg.strengths) or any(not s > 0 for s in cfg.sigmas):
        raise ValueError("every strength and sigma of a row must be > 0 (no defense is always a row)")
    if any(not s >= 0 for s in cfg.bottleneck_strengths) or any(r < 1 for r in cfg.bottleneck_ranks):
        raise ValueError("bottleneck strengths must be >= 0 and bottleneck ranks >= 1")
    rows = [dict(label=f"{_label(k)}, none", cut=k, kind="none", sigma=0.0, strength=0.0) for k in cfg.cuts]
    rows += [dict(label=f"{_label(cfg.defense_cut)} + clip + noise {s:.3g}", cut=cfg.defense_cut, kind="noise",
                  sigma=s, strength=0.0) for s in cfg.sigmas]
    noise = f" + clip + noise {cfg.learned_sigma:.3g}" if cfg.learned_sigma > 0 else ""
    rows += [dict(label=f"{_label(k)} + learned {lam:.3g}{noise}", cut=k, kind="learned", sigma=cfg.learned_sigma,
                  strength=lam) for k in cfg.learned_cuts for lam in cfg.strengths]
    # strength-major: the adversarial rows first, the lambda-0 controls after (stop a run early, keep those)
    rows += [dict(label=f"{_label(k)} + bottleneck {r} + {f'learned {lam:.3g}' if lam else 'no adversary'}{noise}",
                  cut=k, kind="bottleneck", sigma=cfg.learned_sigma, strength=lam, bottleneck=r)
             for k in cfg.learned_cuts for lam in cfg.bottleneck_strengths for r in cfg.bottleneck_ranks]
    return rows


def _defense(cfg: DefendConfig, row: dict, clip_norm: float) -> Defense:
    if row["kind"] == "none":
        return Defense()
    if row["kind"] == "noise":
        return Defense(clip_norm, row["sigma"])
    learned = PrivacyAdapterConfig(strength=row["strength"], rank=cfg.rank, inverter_steps=cfg.inverter_steps,
                                   inverter_lr=cfg.inverter_lr, adapter_lr=cfg.adapter_lr,
                                   warmup_steps=cfg.warmup_steps, distortion=cfg.distortion,
                                   bottleneck=row.get("bottleneck", 0))
    # clipping fixes the scale the noise is measured against: without it the adapter could simply
    # grow its output until any noise is negligible
    return Defense(clip_norm if row["sigma"] > 0 else None, row["sigma"], learned)


def _attack_row(cfg: DefendConfig, row: dict, index: int, defense: Defense, trained: TrainedHead,
                public: HeadBlocks, victims: TokenWindows, shadow: TokenWindows, tokenizer, log: Log) -> dict:
    k = row["cut"]
    observed = defense.apply(trained.cut(victims.input_ids, victims.attention_mask, k), victims.attention_mask,
                             noise_generator(cfg.seed, "victim", index))
    every = max(1, cfg.learned_steps // 3)
    retrained = LearnedInverter.train(_stack_cuts(trained, shadow, k), shadow.input_ids, shadow.attention_mask, trained,
                                      defense, cfg.learned_steps, seed=cfg.seed,
                                      on_step=_progress(log, "retrained attacker", every))
    guesses = {"retrained": retrained(observed, victims.attention_mask)}
    if defense.adapted and cfg.public_attack:  # otherwise the public head differs only by the LoRA: (a') covers it
        naive = LearnedInverter.train(_stack_cuts(public, shadow, k), shadow.input_ids, shadow.attention_mask, public,
                                      Defense(defense.clip_norm, defense.sigma), cfg.learned_steps, seed=cfg.seed,
                                      on_step=_progress(log, "public-weights attacker", every))
        guesses["public"] = naive(observed, victims.attention_mask)
    guesses["optimization"] = optimization_attack(observed, victims.attention_mask, trained, k, defense,
                                                  cfg.optim_steps, cfg.optim_lr,
                                                  _progress(log, "optimization", max(1, cfg.optim_steps // 3)))
    guesses["nearest"] = nearest_embedding_attack(observed, victims.attention_mask, public)
    scores = {n: score_inversion(tokenizer, g, victims.input_ids, victims.attention_mask).to_json()
              for n, g in guesses.items()}
    return scores


def run_defend(cfg: DefendConfig, log: Log, on_row: Callable[[dict], None] | None = None) -> dict:
    """Run every row; ``on_row(doc)`` gets the document so far after each row (partial reports)."""
    started = time.perf_counter()
    rows = plan_rows(cfg)
    model_dir = resolve_model_dir(cfg.model)
    model_config = load_config(model_dir)
    n_layers = model_config.num_hidden_layers
    deepest = max(r["cut"] for r in rows)
    if min(r["cut"] for r in rows) < 1:
        raise ValueError("a silo keeps at least one head block: every cut must be >= 1")
    if deepest + 2 > n_layers:
        raise ValueError(f"a cut of {deepest} blocks leaves no trunk and tail in a {n_layers}-layer model")
    hidden = model_config.hidden_size
    if any(r.get("bottleneck", 0) >= hidden for r in rows):  # before any fine-tune, not an hour in
        raise ValueError(f"a bottleneck rank must be below the hidden size {hidden}")
    tokenizer = load_tokenizer(model_dir)
    public = HeadBlocks(model_dir, deepest)
    victims = victim_windows(tokenizer, cfg.victims, cfg.max_tokens, cfg.seed)
    shadow = shadow_windows(tokenizer, cfg.shadow, cfg.max_tokens, cfg.seed + 1)
    real = shadow.attention_mask.bool()
    clip_norms = {k: cfg.clip_norm or float(_stack_cuts(public, shadow, k).norm(dim=-1)[real].median())
                  for k in sorted({r["cut"] for r in rows})}
    log(f"{cfg.model}: {len(victims.input_ids)} victim texts, {len(shadow.input_ids)} shadow windows; "
        f"clip norms {', '.join(f'cut {k}: {v:.3g}' for k, v in clip_norms.items())}")
    doc = {"audit": "defend", "model": cfg.model, "model_dir": str(model_dir), "hidden_size": public.hidden_size,
           "num_layers": n_layers, "config": asdict(cfg), "clip_norms": clip_norms,
           "victim_tokens": int(victims.attention_mask.sum()), "rows": [], "torch_threads": torch.get_num_threads()}

    baseline = None  # the undefended fine-tune, at the deepest undefended cut: serves every cut
    for i, row in enumerate(rows, 1):
        k = row["cut"]
        defense = _defense(cfg, row, clip_norms[k])
        log(f"[{i}/{len(rows)}] {row['label']}")
        t0 = time.perf_counter()
        if row["kind"] == "none" and baseline is not None:
            scores, pipe, ft_s = baseline
        else:
            cut = max(cfg.cuts) if row["kind"] == "none" else k
            scores, pipe = finetune(model_dir, cut, defense, cfg.finetune,
                                    _progress(log, "fine-tune", max(1, cfg.finetune.steps // 4)))
            ft_s = time.perf_counter() - t0
            if row["kind"] == "none":
                baseline = (scores, pipe, ft_s)
        trained = TrainedHead(pipe.head, pipe.adapter)
        attacks = _attack_row(cfg, row, i, defense, trained, public, victims, shadow, tokenizer, log)
        out = dict(row, clip_norm=defense.clip_norm, attacks=attacks, utility=scores.to_json(),
                   strongest=max(a["token_recovery"] for a in attacks.values()),
                   finetune_s_per_step=round(ft_s / max(cfg.finetune.steps, 1), 2),
                   noise_ratio=(row["sigma"] * math.sqrt(public.hidden_size) / defense.clip_norm
                                if defense.clip_norm and row["sigma"] else 0.0))
        if pipe.adapter is not None:
            out["silo_inverter_loss"] = [round(v, 4) for v in pipe.inverter_losses]
            out["warmup_inverter_loss"] = [round(v, 4) for v in pipe.warmup_losses]
            out["task_loss"] = [round(v, 4) for v in pipe.task_losses]
            out["defense_parameters"] = {"adapter": sum(p.numel() for p in pipe.adapter.parameters()),
                                         "inverter": sum(p.numel() for p in pipe.inverter.parameters())}
        if pipe.kept_energy is not None:
            out["bottleneck_kept_energy"] = round(pipe.kept_energy, 4)
        log("  " + ", ".join(f"{n} {a['token_recovery']:.1f}%" for n, a in attacks.items())
            + f"; accuracy {scores.eval_accuracy:.1f}%")
        doc["rows"].append(out)
        doc["wall_s"] = round(time.perf_counter() - started, 1)
        if on_row is not None:
            on_row(doc)
    return doc
