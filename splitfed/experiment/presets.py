"""Presets of `splitfed experiment bbc`: what a run costs and how it is judged.

`fast` fits in 15 minutes on a 2-core CPU (short prompts, a few dozen steps per silo, 100
held-out articles); `full` is for a GPU (longer articles, more steps, the whole held-out split).
Both arms (split-fed and centralized) always share every training hyper-parameter and the step
budget: centralized runs silos x steps updates of the same batch size on the union of the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preset:
    name: str
    silos: int
    steps: int  # per silo; centralized trains silos * steps steps
    local_steps: int
    batch_size: int
    max_length: int
    max_chars: int  # article characters in a prompt (title + the start of the body)
    train_per_topic: int | None  # None: every article not held out
    eval_per_topic: int
    lr: float
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0  # adapter initialisation, data order, and which articles are held out
    wire_dtype: str = "fp32"  # split-fed arm only: int8 / fp8-* compress activations and gradients on the wire
    max_new_tokens: int = 3
    eval_batch_size: int = 8
    perplexity_examples: int = 50  # the first N held-out examples (perplexity costs a full pass)

    def with_overrides(self, **changes) -> Preset:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "fast": Preset(name="fast", silos=3, steps=24, local_steps=8, batch_size=4, max_length=128, max_chars=300,
                   train_per_topic=60, eval_per_topic=20, lr=2e-3, perplexity_examples=30),
    "full": Preset(name="full", silos=4, steps=200, local_steps=20, batch_size=8, max_length=256, max_chars=800,
                   train_per_topic=None, eval_per_topic=60, lr=1e-3, perplexity_examples=300),
}
