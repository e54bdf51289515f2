"""Split generation with KV caches equals generation without caches and plain transformers `generate`.

Tiny random models in fp32. Left-padded batches of unequal prompt lengths, so padding is exercised.
"""

from __future__ import annotations

import pytest
import torch

from shared.model.adapters import AdapterConfig, apply_adapter
from shared.model.generation import LocalTrunk, Sampling, choose_next, encode_prompts, split_generate
from shared.model.part_loading import build_part, build_silo_parts
from shared.model.tiny_models import make_tiny_model_dir
from shared.model.model_split import positions_from_mask
from splitfed.reference.reference import UnsplitModel
from shared.data.tokenizer import byte_tokenizer

EOS, PAD = 259, 0
SEED = 7


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-gen")
    return {fam: make_tiny_model_dir(root / fam, fam, seed=3) for fam in ("llama", "qwen2", "gpt2")}


def _prompts(batch: int = 3, width: int = 9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 250, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, unequal lengths
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _parts(model_dir, cfg: AdapterConfig | None):
    head, tail = build_silo_parts(model_dir)
    trunk = build_part(model_dir, "trunk")
    if cfg is not None:
        for part in (head, trunk, tail):
            apply_adapter(part, cfg, SEED)
    return head, trunk, tail


@torch.no_grad()
def _recompute(head, trunk, tail, ids, mask, sampling: Sampling) -> torch.Tensor:
    """No caches: the whole sequence through all three parts for every new token."""
    generator = torch.Generator().manual_seed(sampling.seed)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    out = []
    for _ in range(sampling.max_new_tokens):
        pos = positions_from_mask(mask)
        logits = tail(trunk(head(ids, mask, pos), mask, pos), mask, pos)[:, -1]
        token = choose_next(logits, sampling, generator)
        token = torch.where(finished, torch.full_like(token, PAD), token)
        out.append(token)
        finished |= token == EOS
        if finished.all():
            break
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], 1)
    return torch.stack(out, 1)


class RecordingTrunk(LocalTrunk):
    """A local trunk that notes the shape of every h1 it receives (what would cross the wire)."""

    def __init__(self, trunk) -> None:
        super().__init__(trunk)
        self.shapes: list[tuple[int, ...]] = []
        self.closed = False

    def __call__(self, hidden, mask, positions):
        self.shapes.append((tuple(hidden.shape), tuple(mask.shape), tuple(positions.shape)))
        return super().__call__(hidden, mask, positions)

    def close(self) -> None:
        self.closed = True
        super().close()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_split_generation_equals_transformers_generate(model_dirs, family):
    head, trunk, tail = _parts(model_dirs[family], None)
    ids, mask = _prompts()
    sampling = Sampling(max_new_tokens=12)
    ours = split_generate(head, tail, LocalTrunk(trunk), ids, mask, sampling, EOS, PAD)
    full = UnsplitModel(model_dirs[family], AdapterConfig(kind="full"), SEED).model
    ref = full.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                        eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    assert ours.shape == ref.shape == (3, 12)
    assert torch.equal(ours, ref)


def test_lora_split_generation_equals_transformers_generate_with_the_same_lora(model_dirs):
    cfg = AdapterConfig(kind="lora", lora_init_b="random")
    head, trunk, tail = _parts(model_dirs["llama"], cfg)
    ids, mask = _prompts()
    ours = split_generate(head, tail, LocalTrunk(trunk), ids, mask, Sampling(max_new_tokens=10), EOS, PAD)
    full = UnsplitModel(model_dirs["llama"], cfg, SEED).model  # same LoRA tensors, by name and seed
    ref = full.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                        eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    plain_head, plain_trunk, plain_tail = _parts(model_dirs["llama"], None)
    base = split_generate(plain_head, plain_tail, LocalTrunk(plain_trunk), ids, mask, Sampling(max_new_tokens=10), EOS, PAD)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, base)  # the adapter changes what is generated: the check has teeth


@pytest.mark.parametrize("family,kind", [("llama", None), ("llama", "lora"), ("llama", "prefix"),
                                         ("qwen2", "prefix"), ("gpt2", "prefix")])
@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=10),
                                      Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)],
                         ids=["greedy", "top-p"])
def test_cached_generation_equals_recomputing_everything(model_dirs, family, kind, sampling):
    cfg = None if kind is None else AdapterConfig(kind=kind, lora_init_b="random", prefix_init_std=0.5)
    head, trunk, tail = _parts(model_dirs[family], cfg)
    ids, mask = _prompts()
    cached = split_generate(head, tail, LocalTrunk(trunk), ids, mask, sampling, EOS, PAD)
    assert torch.equal(cached, _recompute(head, trunk, tail, ids, mask, sampling))


def test_after_the_prompt_only_one_position_reaches_the_trunk_and_its_cache_is_freed(model_dirs):
    head, trunk, tail = _parts(model_dirs["llama"], None)
    ids, mask = _prompts()
    recorder = RecordingTrunk(trunk)
    tokens = split_generate(head, tail, recorder, ids, mask, Sampling(max_new_tokens=6), EOS, PAD)
    b, t, hidden = ids.shape[0], ids.shape[1], head.config.hidden_size
    assert recorder.shapes[0] == ((b, t, hidden), (b, t), (b, t))
    assert recorder.shapes[1:] == [((b, 1, hidden), (b, 1), (b, 1))] * (tokens.shape[1] - 1)
    assert recorder.closed and recorder.session.cache is None


def test_sampling_is_seeded(model_dirs):
    head, trunk, tail = _parts(model_dirs["llama"], None)
    ids, mask = _prompts()

    def run(seed):
        return split_generate(head, tail, LocalTrunk(trunk), ids, mask,
                              Sampling(max_new_tokens=8, temperature=1.0, seed=seed), EOS, PAD)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_right_padded_prompts_are_refused(model_dirs):
    head, trunk, tail = _parts(model_dirs["llama"], None)
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        split_generate(head, tail, LocalTrunk(trunk), ids, mask, Sampling(), EOS, PAD)


def test_encode_prompts_left_pads_and_truncates_from_the_left():
    tok = byte_tokenizer()
    ids, mask = encode_prompts(tok, ["abc", "hello world"], max_prompt_tokens=5)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert tok.decode(ids[0, 2:]) == "abc" and tok.decode(ids[1]) == "world"
    with pytest.raises(ValueError):
        Sampling(top_p=0)
