"""Evaluate a model on held-out examples: generate, score the texts, and measure perplexity.

* generation metrics on {prompt, completion} examples: the model completes each prompt (split
  generation with KV caches, greedy unless told otherwise); exact match and ROUGE-L against the
  completion, and with labels, accuracy and macro-F1 (parsing rule in splitfed/evaluation/task_metrics.py);
* perplexity on every example: exp(mean negative log-likelihood per completion token), teacher
  forced, tokenized exactly as for training ({text} examples: every token).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from shared.data.dataset import IGNORE_INDEX, Example, collate, encode_example
from shared.model.generation import LocalTrunk, Sampling, generate_texts
from shared.model.model_split import positions_from_mask
from splitfed.evaluation.task_metrics import classification_metrics, exact_match, parse_label, rouge_l
from splitfed.evaluation.trained_parts import SplitModel


@torch.no_grad()
def perplexity(model: SplitModel, tokenizer, examples: Sequence[Example], max_length: int, batch_size: int) -> float:
    nll, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate([encode_example(tokenizer, ex, max_length) for ex in examples[start:start + batch_size]],
                        tokenizer.pad_token_id)
        logits = model.logits(batch.input_ids, batch.attention_mask, positions_from_mask(batch.attention_mask))
        labels = batch.labels[:, 1:]
        nll += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((labels != IGNORE_INDEX).sum())
    return math.exp(nll / tokens) if tokens else float("nan")


def evaluate(model: SplitModel, tokenizer, examples: Sequence[Example], labels: Sequence[str] | None = None,
             sampling: Sampling | None = None, batch_size: int = 8, max_prompt_tokens: int = 512,
             max_length: int = 512, with_perplexity: bool = True) -> dict:
    """Metrics (percentages, perplexity) and every prediction; ``labels`` turns on classification."""
    sampling = sampling or Sampling(max_new_tokens=16)
    started = time.perf_counter()
    prompted = [ex for ex in examples if ex.prompt]
    result: dict = {"examples": len(examples)}
    if prompted:
        texts = generate_texts(tokenizer, model.head, model.tail, lambda: LocalTrunk(model.trunk),
                               [ex.prompt for ex in prompted], sampling, batch_size, max_prompt_tokens)
        refs = [ex.completion.strip() for ex in prompted]
        result.update(exact_match=exact_match(texts, refs), rouge_l=rouge_l(texts, refs))
        predictions = [{"prompt": ex.prompt, "reference": ref, "generated": text}
                       for ex, text, ref in zip(prompted, texts, refs)]
        if labels:
            parsed = [parse_label(t, labels) for t in texts]
            result.update(classification_metrics(parsed, refs))
            for p, label in zip(predictions, parsed):
                p["label"] = label
        result["predictions"] = predictions
    if with_perplexity:
        result["perplexity"] = perplexity(model, tokenizer, examples, max_length, batch_size)
    result["eval_s"] = round(time.perf_counter() - started, 2)
    return result
