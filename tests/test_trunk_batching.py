"""Client-batch and hierarchical trunk mechanics, in process on a tiny model.

* padding silos to a common length and concatenating them changes no silo's output or gradient;
* a straggler's missing slice counts as zero and the trunk averages over the slices that came;
* per-silo trunk adapters share one frozen base (same storage), and stay apart under interleaving.
"""

from __future__ import annotations

import pytest
import torch

from shared.model.adapters import AdapterConfig, apply_adapter
from shared.model.batching import concat_padded, scatter_grads, take
from shared.model.part_loading import build_part
from shared.model.tiny_models import make_tiny_model_dir
from shared.model.model_split import positions_from_mask
from shared.wire.protocol import Kind
from shared.wire.wire import FrameError, Message, bundle_from_wire, bundle_to_wire, message_to_wire
from trunk_worker.batch_step import BatchSteps
from trunk_worker.silo_adapters import SiloAdapters

LORA = AdapterConfig(kind="lora", lora_r=4, lora_alpha=8, lora_init_b="random")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=1)


def _trunk(model_dir, cfg=LORA):
    trunk = build_part(model_dir, "trunk", 1, 1)
    return trunk, apply_adapter(trunk, cfg, seed=0)


def _member(silo: str, b: int, t: int, real: list[int], seed: int, h: int = 64) -> Message:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, t, dtype=torch.long)
    for row, n in enumerate(real):
        mask[row, :n] = 1
    hidden = torch.randn(b, t, h, generator=gen)
    return Message(Kind.FORWARD, "r", silo, 0, 3, tensors=[hidden, mask.to(torch.uint8),
                                                          positions_from_mask(mask).to(torch.int32)])


def test_padded_batch_equals_each_silo_alone(model_dir):
    trunk, _ = _trunk(model_dir)
    members = [_member("a", 2, 5, [5, 3], 1), _member("b", 3, 9, [9, 9, 2], 2), _member("c", 1, 4, [4], 3)]
    hidden, mask, pos, slices = concat_padded([m.tensors[0] for m in members],
                                              [m.tensors[1].long() for m in members], [m.tensors[2].long() for m in members])
    assert hidden.shape == (6, 9, 64)
    batched = trunk(hidden, mask, pos)
    for m, s in zip(members, slices):
        alone = trunk(m.tensors[0], m.tensors[1].long(), m.tensors[2].long())
        real = m.tensors[1].bool()
        assert torch.allclose(take(batched, s)[real], alone[real], rtol=0, atol=1e-5)


def test_straggler_slice_is_zero_and_the_update_is_the_mean_of_the_rest(model_dir):
    trunk, params = _trunk(model_dir)
    steps = BatchSteps(trunk, torch.device("cpu"), torch.float32, straggler_timeout_s=0.0)
    members = [_member("a", 2, 6, [6, 4], 5), _member("b", 2, 6, [6, 6], 6)]
    bundle, outs = steps.forward(members)
    grad_a = torch.randn_like(outs[0])
    steps.add_grad(Message(Kind.BACKWARD, "r", "a", 0, 3, tensors=[grad_a]))
    assert not bundle.complete()
    assert steps.expired() == [bundle]  # b never answers
    dh1 = steps.backward(bundle)
    assert set(dh1) == {"a"}
    got = [p.grad.clone() for p in params]

    # Reference: silo a alone through a fresh trunk with the same weights, gradient / 1 contributor.
    ref_trunk, ref_params = _trunk(model_dir)
    h1 = members[0].tensors[0].clone().requires_grad_(True)
    out = ref_trunk(h1, members[0].tensors[1].long(), members[0].tensors[2].long())
    out.backward(grad_a)
    for g, p in zip(got, ref_params):
        assert torch.allclose(g, p.grad, rtol=0, atol=1e-5)
    assert torch.allclose(dh1["a"], h1.grad, rtol=0, atol=1e-5)
    assert steps.by_member == {}


def test_scatter_grads_places_each_slice():
    _, _, _, slices = concat_padded([torch.zeros(1, 2, 3), torch.zeros(2, 4, 3)],
                                    [torch.ones(1, 2, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)],
                                    [torch.zeros(1, 2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)])
    full = scatter_grads([torch.ones(1, 2, 3), None], slices, torch.zeros(3, 4, 3))
    assert full.sum().item() == 6 and full[0, :2].eq(1).all()


def test_per_silo_adapters_share_the_base_and_stay_apart(model_dir):
    trunk, _ = _trunk(model_dir)
    base_ptrs = {n: p.data_ptr() for n, p in trunk.named_parameters() if not p.requires_grad}
    adapters = SiloAdapters(trunk, lr=1e-2, weight_decay=0.0)
    m = _member("a", 1, 5, [5], 9)
    for silo in ("a", "b", "a"):  # interleaved: a's second step must see a's own update only
        opt = adapters.activate(silo)
        out = trunk(m.tensors[0], m.tensors[1].long(), m.tensors[2].long())
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    assert {n: p.data_ptr() for n, p in trunk.named_parameters() if not p.requires_grad} == base_ptrs
    a, b = adapters.params["a"], adapters.params["b"]
    assert any(not torch.equal(x, y) for x, y in zip(a, b))  # a took two steps, b one
    extra = sum(p.numel() for p in a)
    base = sum(p.numel() for p in trunk.parameters() if not p.requires_grad)
    assert extra < base / 10  # a silo costs an adapter, not a trunk
    total, weight = adapters.weighted_sum({"a": 1, "b": 3})
    adapters.set_all(total / weight)
    assert all(torch.equal(x, y) for x, y in zip(adapters.params["a"], adapters.params["b"]))


def test_a_silos_adapter_and_moments_are_one_buffer_and_train_like_plain_adamw(model_dir):
    """The flat per-silo state (parameters | exp_avg | exp_avg_sq) changes no number: three steps
    equal plain AdamW on separate tensors, and a checkpoint restores into the same buffer."""
    from shared.state import checkpoint
    from shared.model.optim import make_optimizer

    trunk, _ = _trunk(model_dir)
    adapters = SiloAdapters(trunk, lr=1e-2, weight_decay=0.01)
    plain = [torch.nn.Parameter(t.clone()) for t in adapters.template]
    plain_opt = make_optimizer(plain, 1e-2, 0.01)
    m = _member("a", 2, 5, [5, 3], 4)
    for _ in range(3):
        opt = adapters.activate("a")
        trunk(m.tensors[0], m.tensors[1].long(), m.tensors[2].long()).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # the same steps on plain tensors (the trunk's slots point at silo a's views: swap them out)
    slots = [(owner, attr) for owner, attr, _ in adapters.slots]
    for (owner, attr), p in zip(slots, plain):
        owner._parameters[attr] = p
    with torch.no_grad():
        for p, t in zip(plain, adapters.template):
            p.copy_(t)
    for _ in range(3):
        trunk(m.tensors[0], m.tensors[1].long(), m.tensors[2].long()).square().mean().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
    assert all(torch.equal(x, y) for x, y in zip(adapters.params["a"], plain))
    flat = adapters.flat["a"]
    storage = flat.untyped_storage().data_ptr()
    state = adapters.optimizers["a"].state
    assert all(p.untyped_storage().data_ptr() == storage for p in adapters.params["a"])
    assert all(state[p][k].untyped_storage().data_ptr() == storage
               for p in adapters.params["a"] for k in ("exp_avg", "exp_avg_sq"))
    assert all(torch.equal(state[p]["exp_avg"], plain_opt.state[q]["exp_avg"])
               for p, q in zip(adapters.params["a"], plain))
    saved = checkpoint.optimizer_tensors(adapters.optimizers["a"])
    saved = {k: v.clone() for k, v in saved.items()}
    with torch.no_grad():
        for p in adapters.params["a"]:
            state[p]["exp_avg"].zero_()
    checkpoint.load_optimizer_tensors(adapters.optimizers["a"], saved)
    assert all(state[p]["exp_avg"].untyped_storage().data_ptr() == storage for p in adapters.params["a"])
    assert all(torch.equal(state[p]["exp_avg"], plain_opt.state[q]["exp_avg"])
               for p, q in zip(adapters.params["a"], plain))


def test_hierarchical_checkpoint_restores_every_silos_buffer_and_steps(model_dir, tmp_path):
    """A round checkpoint holds each silo's flat buffer and step vector; loading it into a fresh
    worker's adapters gives the same numbers in the same layout (views of one buffer again), and a
    further step from the restored state equals one from the original. A checkpoint without the
    hierarchical state is refused with a clear error."""
    from trunk_worker.checkpointing import load_trunk, save_trunk

    trunk, _ = _trunk(model_dir)
    adapters = SiloAdapters(trunk, lr=1e-2, weight_decay=0.01)
    m = _member("a", 1, 5, [5], 3)

    def step(ad, silo):
        opt = ad.activate(silo)
        trunk(m.tensors[0], m.tensors[1].long(), m.tensors[2].long()).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for silo in ("a", "b", "a"):
        step(adapters, silo)
    save_trunk(tmp_path, 0, [], None, adapters, updates=3)
    expected = {s: adapters.buffers[s].clone() for s in ("a", "b")}
    step(adapters, "a")
    after_one_more = adapters.buffers["a"].clone()

    restored = SiloAdapters(trunk, lr=1e-2, weight_decay=0.01)
    assert load_trunk(tmp_path, 0, [], None, restored) == 3
    assert sorted(restored.buffers) == ["a", "b"]
    assert all(torch.equal(restored.buffers[s], expected[s]) for s in expected)
    assert restored.steps["a"].eq(2).all() and restored.steps["b"].eq(1).all()
    storage = restored.buffers["a"].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == storage for p in restored.params["a"])
    step(restored, "a")
    assert torch.equal(restored.buffers["a"], after_one_more)

    save_trunk(tmp_path / "serial", 0, list(restored.params["a"]), None, None, updates=1)
    with pytest.raises(ValueError, match="no hierarchical trunk state"):
        load_trunk(tmp_path / "serial", 0, [], None, SiloAdapters(trunk, 1e-2, 0.01))


def test_generation_uses_the_silos_own_trunk_adapter_or_the_template(model_dir):
    """Whatever silo trained last, a silo generates through its own adapter; a silo that does not
    train on this worker generates through the template, and no state is created for it."""
    trunk, _ = _trunk(model_dir)
    adapters = SiloAdapters(trunk, lr=5e-2, weight_decay=0.0)
    m = _member("a", 1, 5, [5], 7)

    def out():
        with torch.no_grad():
            return trunk(m.tensors[0], m.tensors[1].long(), m.tensors[2].long())

    template_out = out()
    for silo in ("a", "b", "b"):  # a and b end up with different adapters; b is the one installed
        opt = adapters.activate(silo)
        trunk(m.tensors[0], m.tensors[1].long(), m.tensors[2].long()).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    b_out = out()
    adapters.activate_for_generation("a")
    a_out = out()
    assert not torch.equal(a_out, b_out)
    adapters.activate("a")
    assert torch.equal(out(), a_out)  # what a's own adapter gives
    adapters.activate_for_generation("stranger")
    assert torch.equal(out(), template_out) and "stranger" not in adapters.params
    adapters.activate_for_generation("b")
    assert torch.equal(out(), b_out)


def test_hierarchical_refuses_a_frozen_trunk(model_dir):
    trunk = build_part(model_dir, "trunk", 1, 1)
    trunk.requires_grad_(False)
    with pytest.raises(ValueError, match="adapter"):
        SiloAdapters(trunk, 1e-3, 0.0)


def test_bundle_round_trip_and_malformed_bundles():
    members = [message_to_wire(_member(s, 1, 3, [3], i, h=8)) for i, s in enumerate("ab")]
    frames = bundle_to_wire(Message(Kind.BUNDLE, "r", "broker", 0, 3), members)
    header, got = bundle_from_wire(frames)
    assert header.seq == 2 and [[bytes(f) for f in m] for m in got] == [[bytes(f) for f in m] for m in members]
    with pytest.raises(FrameError):
        bundle_from_wire(frames[:-1])  # truncated
    with pytest.raises(FrameError):
        bundle_from_wire([*frames, b"extra"])
    with pytest.raises(FrameError):
        bundle_from_wire(members[0])  # a FORWARD is not a bundle
