"""What a defense costs: a short LoRA fine-tune on BBC topic classification through the split.

head -> defense -> trunk -> tail in one process, with the same seed, data order, steps and adapter
initialisation for every defense, so the only difference between two runs is the defense. After
training, the held-out examples are scored through the same defended pipeline (a deployed silo
keeps its defense at inference too): completion loss, and topic accuracy from the logits of the
answer's deciding token (argmax over the five topics' tokens there). A learned defense (privacy
adapter, shared/model/privacy_adapter.py, or a rank-k bottleneck, privacy_bottleneck.py) trains during the
same steps, alternating with its inverter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shared.model.adapters import AdapterConfig, apply_adapter, unique_parameters
from splitfed.experiment.bbc import TOPICS, demo_examples
from shared.model.cut_defense import noise_generator
from shared.data.dataset import IGNORE_INDEX, Example, SiloDataset, collate, encode_example
from shared.model.loss import causal_lm_loss
from shared.model.part_loading import build_part, build_silo_parts
from shared.model.model_split import positions_from_mask
from shared.model.optim import make_optimizer
from shared.model.privacy_adapter import (
    SiloInverter,
    SiloVocabulary,
    adversarial_term,
    defend,
    inverter_step,
    privacy_module,
    warmup_step,
)
from shared.model.privacy_bottleneck import PrivacyBottleneck
from shared.data.tokenizer import load_tokenizer
from splitfed.audit.attacks import Defense

OnStep = Callable[[int, int, float], None]


@dataclass(frozen=True)
class FinetuneSpec:
    steps: int = 8
    batch_size: int = 4
    max_length: int = 96
    eval_examples: int = 24
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class UtilityScores:
    train_loss_first: float | None  # loss of the first step (same batch for every defense); None: no steps
    train_loss_last: float | None  # mean loss of the last quarter of the steps
    eval_loss: float  # held-out completion loss after fine-tuning, through the defense
    eval_accuracy: float  # % of held-out articles whose topic the model ranks first

    def to_json(self) -> dict[str, float]:
        return {k: None if v is None else round(v, 4) for k, v in asdict(self).items()}


class SplitPipeline:
    """The silo's head and tail and the trunk, LoRA on all three, the defense at the cut.

    With a learned defense the silo also holds a privacy adapter (trained with the LoRA weights)
    and its own inverter (trained by its own optimizer, alternating with the task step).
    """

    def __init__(self, model_dir: Path, cut: int, spec: FinetuneSpec, defense: Defense | None = None,
                 vocabulary: torch.Tensor | None = None):
        self.head, self.tail = build_silo_parts(model_dir, head_layers=cut, tail_layers=1)
        self.trunk = build_part(model_dir, "trunk", head_layers=cut, tail_layers=1)
        adapter = AdapterConfig()
        params = [apply_adapter(part, adapter, spec.seed) for part in (self.head, self.trunk, self.tail)]
        self.adapter: torch.nn.Module | None = None  # the privacy adapter or bottleneck
        self.inverter: SiloInverter | None = None
        self.inverter_losses: list[float] = []  # the silo inverter's loss at each training step
        self.warmup_losses: list[float] = []  # the silo inverter's loss at each warm-up step
        self.task_losses: list[float] = []  # the task loss alone (the step's loss less the adversarial term)
        self.kept_energy: float | None = None  # a bottleneck's: share of h1's energy its initial subspace keeps
        if defense is not None and defense.adapted:
            if vocabulary is None:
                raise ValueError("a learned defense needs the silo's vocabulary (its training data's token ids)")
            embeddings = self.head.get_submodule(self.head.facts.embed).weight
            self.vocab = SiloVocabulary(vocabulary, embeddings.shape[0])
            hidden = embeddings.shape[1]
            self.adapter = privacy_module(defense.learned, hidden, seed=spec.seed)  # adapter or bottleneck
            self.inverter = SiloInverter(hidden)
            self.inverter_opt = torch.optim.Adam(self.inverter.parameters(), lr=defense.learned.inverter_lr)
            # its own optimizer: the adapter must move within a few steps, LoRA at its own pace
            self.adapter_opt = torch.optim.Adam(self.adapter.parameters(), lr=defense.learned.adapter_lr)
        self.params = unique_parameters(*params)

    @property
    def table(self) -> torch.Tensor:
        """The embeddings of the silo's vocabulary: what its inverter guesses among."""
        return self.vocab.table(self.head.get_submodule(self.head.facts.embed).weight)

    def defended(self, input_ids, attention_mask, defense: Defense, generator: torch.Generator) -> torch.Tensor:
        """What the silo sends: the head, then (learned) the privacy adapter, then clipping and noise."""
        positions = positions_from_mask(attention_mask)
        hidden = self.head(input_ids, attention_mask, positions)
        if self.adapter is not None:
            return defend(self.adapter, hidden, attention_mask, defense.clip_norm, defense.sigma, generator)
        return defense.apply(hidden, attention_mask, generator)  # on the silo, before sealing

    def from_cut(self, defended: torch.Tensor, attention_mask) -> torch.Tensor:
        positions = positions_from_mask(attention_mask)
        return self.tail(self.trunk(defended, attention_mask, positions), attention_mask, positions)

    def logits(self, input_ids, attention_mask, defense: Defense, generator: torch.Generator) -> torch.Tensor:
        return self.from_cut(self.defended(input_ids, attention_mask, defense, generator), attention_mask)

    @torch.no_grad()
    def init_bottleneck(self, data: SiloDataset, batches: int = 16) -> None:
        """A bottleneck starts as the projection on the top-k principal directions of h1 over the
        silo's first ``batches`` training batches (its own data: nothing else is needed)."""
        hidden, masks = [], []
        for step in range(batches):
            batch = data.batch(step)
            hidden.append(self.head(batch.input_ids, batch.attention_mask, positions_from_mask(batch.attention_mask)))
            masks.append(batch.attention_mask.bool())
        real = torch.cat([h[m] for h, m in zip(hidden, masks)])
        self.kept_energy = self.adapter.init_principal(real.unsqueeze(0), torch.ones(1, len(real), dtype=torch.long))

    def warm_up(self, data: SiloDataset, defense: Defense, seed: int) -> None:
        """The learned defense's head-only warm-up (privacy_adapter.warmup_step) on the training batches
        (a bottleneck first takes its data's principal directions)."""
        cfg = defense.learned
        if isinstance(self.adapter, PrivacyBottleneck):
            self.init_bottleneck(data)
        for step in range(cfg.warmup_steps):
            batch = data.batch(step)
            with torch.no_grad():
                hidden = self.head(batch.input_ids, batch.attention_mask, positions_from_mask(batch.attention_mask))
            targets = self.vocab.targets(batch.input_ids, batch.attention_mask)
            loss, _ = warmup_step(self.adapter, self.adapter_opt, self.inverter, self.inverter_opt, hidden, targets,
                                  batch.attention_mask, self.table, cfg, defense.clip_norm, defense.sigma,
                                  noise_generator(seed, "utility-warmup", step))
            self.warmup_losses.append(loss)

    def training_loss(self, batch, defense: Defense, generator: torch.Generator) -> torch.Tensor:
        """The task loss; with a learned defense, first an inverter update, then minus its loss."""
        cut = self.defended(batch.input_ids, batch.attention_mask, defense, generator)
        loss = causal_lm_loss(self.from_cut(cut, batch.attention_mask), batch.labels)
        if self.adapter is None:
            return loss
        cfg, table = defense.learned, self.table
        targets = self.vocab.targets(batch.input_ids, batch.attention_mask)
        self.inverter_losses.append(inverter_step(self.inverter, self.inverter_opt, cut, targets,
                                                  batch.attention_mask, table, cfg.inverter_steps))
        self.task_losses.append(float(loss.detach()))
        return loss + adversarial_term(self.inverter, cut, targets, batch.attention_mask, table, cfg.strength)

def _split_examples(n_eval: int) -> tuple[list[Example], list[Example]]:
    records = demo_examples()
    if not 1 <= n_eval < len(records):
        raise ValueError(f"eval_examples must be in 1..{len(records) - 1}, got {n_eval}")
    examples = [Example(r["prompt"], r["completion"]) for r in records]
    return examples[n_eval:], examples[:n_eval]


def _topic_tokens(tokenizer) -> tuple[int, torch.Tensor]:
    """(offset, ids): the answers' first differing token (a byte tokenizer shares the leading space)."""
    seqs = [tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in TOPICS]
    for offset in range(min(map(len, seqs))):
        ids = [s[offset] for s in seqs]
        if len(set(ids)) == len(ids):
            if all(s[:offset] == seqs[0][:offset] for s in seqs):
                return offset, torch.tensor(ids)
            break
    raise ValueError("this tokenizer gives the topics no common prefix followed by distinct tokens")


@torch.no_grad()
def _evaluate(pipe: SplitPipeline, tokenizer, examples: list[Example], spec: FinetuneSpec,
              defense: Defense) -> tuple[float, float]:
    offset, topic_ids = _topic_tokens(tokenizer)
    total_loss, total_tokens, correct = 0.0, 0, 0
    for start in range(0, len(examples), spec.batch_size):
        chunk = examples[start:start + spec.batch_size]
        batch = collate([encode_example(tokenizer, ex, spec.max_length) for ex in chunk], tokenizer.pad_token_id)
        gen = noise_generator(spec.seed, "utility-eval", start)
        logits = pipe.logits(batch.input_ids, batch.attention_mask, defense, gen)
        n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        total_loss += float(causal_lm_loss(logits, batch.labels)) * n
        total_tokens += n
        for row, labels in enumerate(batch.labels):
            at = int((labels != IGNORE_INDEX).nonzero()[0]) + offset  # the answer's deciding token
            guess = int(logits[row, at - 1, topic_ids].argmax())
            correct += int(topic_ids[guess] == labels[at])
    return total_loss / total_tokens, 100.0 * correct / len(examples)


def finetune(model_dir: Path, cut: int, defense: Defense, spec: FinetuneSpec,
             on_step: OnStep | None = None) -> tuple[UtilityScores, SplitPipeline]:
    """Fine-tune with ``defense`` at a cut of ``cut`` head blocks; score the held-out examples.

    Returns the scores and the trained pipeline (the audit attacks its trained, defended head).
    ``on_step`` gets the task loss (without a learned defense's adversarial term).
    """
    if cut < 1:
        raise ValueError("a silo keeps at least one head block: defenses apply at cut >= 1")
    tokenizer = load_tokenizer(model_dir)
    train, held_out = _split_examples(spec.eval_examples)
    data = SiloDataset(train, tokenizer, spec.batch_size, spec.max_length, spec.seed, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        vocabulary = torch.tensor([t for ids, _ in data.encoded for t in ids])
        pipe = SplitPipeline(model_dir, cut, spec, defense, vocabulary)
    opt = make_optimizer(pipe.params, spec.lr, 0.0)
    if pipe.adapter is not None:
        pipe.warm_up(data, defense, spec.seed)
    losses = []
    for step in range(spec.steps):
        batch = data.batch(step)
        gen = noise_generator(spec.seed, "utility-train", step)
        loss = pipe.training_loss(batch, defense, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if pipe.adapter is not None:
            pipe.adapter_opt.step()
            pipe.adapter_opt.zero_grad(set_to_none=True)
        losses.append(pipe.task_losses[-1] if pipe.adapter is not None else float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, spec.steps, losses[-1])
    eval_loss, accuracy = _evaluate(pipe, tokenizer, held_out, spec, defense)
    if not losses:
        return UtilityScores(None, None, eval_loss, accuracy), pipe
    last = losses[-max(1, len(losses) // 4):]
    return UtilityScores(losses[0], sum(last) / len(last), eval_loss, accuracy), pipe


def finetune_cost(model_dir: Path, cut: int, defense: Defense, spec: FinetuneSpec,
                  on_step: OnStep | None = None) -> UtilityScores:
    """`finetune`'s scores alone."""
    return finetune(model_dir, cut, defense, spec, on_step)[0]
