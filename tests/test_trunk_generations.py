"""The trunk's generation caches: opened by step 0, continued in order, bounded, freed; the broker's routes."""

from __future__ import annotations

import pytest
import torch

from broker.generation_routes import GenerationRoutes
from shared.model.generation import LocalTrunk
from shared.model.part_loading import build_part
from shared.model.tiny_models import make_tiny_model_dir
from shared.wire.protocol import Kind
from shared.wire.wire import Header, Message
from trunk_worker.generation import GenerationError, TrunkGenerations


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    return build_part(make_tiny_model_dir(tmp_path_factory.mktemp("tg") / "m", "llama", seed=1), "trunk")


def _gen(silo: str, step: int, t: int, pos0: int = 0, hidden: int = 64) -> Message:
    h = torch.randn(2, t, hidden, generator=torch.Generator().manual_seed(step))
    return Message(Kind.GENERATE, "run", silo, 0, step, tensors=[
        h, torch.ones(2, t, dtype=torch.uint8), (torch.arange(pos0, pos0 + t, dtype=torch.int32)[None]).expand(2, t)])


def test_trunk_generation_equals_a_local_trunk_and_is_bounded(trunk):
    gens = TrunkGenerations(trunk, torch.device("cpu"), torch.float32, max_sessions=2, max_tokens=8)
    local = LocalTrunk(trunk)
    for step, (t, pos0) in enumerate([(5, 0), (1, 5), (1, 6)]):
        msg = _gen("silo0", step, t, pos0)
        reply = gens.handle(msg)
        assert reply.kind == Kind.GENERATE_RESULT and reply.step == step
        assert torch.equal(reply.tensors[0], local(*msg.tensors))
    with pytest.raises(GenerationError, match="no_generation"):
        gens.handle(_gen("silo0", 7, 1, 7))  # out of order
    with pytest.raises(GenerationError, match="too_long"):
        gens.handle(_gen("silo0", 3, 2, 7))  # 7 + 2 > 8 positions
    assert "silo0" not in gens.active  # a refused over-long generation is dropped
    gens.handle(_gen("a", 0, 2))
    gens.handle(_gen("b", 0, 2))
    gens.handle(_gen("c", 0, 2))  # a third silo: the least recently used cache goes
    assert list(gens.active) == ["b", "c"]
    assert gens.handle(Message(Kind.GENERATE_END, "run", "b", 0, 1)) is None
    assert list(gens.active) == ["c"]
    with pytest.raises(GenerationError, match="no_generation"):
        gens.handle(_gen("b", 1, 1, 2))  # ended: nothing to continue
    gens.idle_s = 0.0
    gens.handle(_gen("d", 0, 2))
    assert list(gens.active) == ["d"]  # c expired while idle
    with pytest.raises(GenerationError, match="hidden size"):
        gens.handle(_gen("e", 0, 2, hidden=32))


def test_broker_routes_a_generation_to_one_worker_until_its_end():
    routes = GenerationRoutes()
    workers = {"w1": "worker-1", "w0": "worker-0"}
    header = lambda kind, step: Header(kind, "run", "silo0", 0, step)  # noqa: E731
    assert routes.pick(header(Kind.GENERATE, 1), workers) is None  # no generation opened yet
    assert routes.pick(header(Kind.GENERATE, 0), workers) == "worker-0"
    assert routes.pick(header(Kind.GENERATE, 1), {"w1": "worker-1", "w0": "worker-0", "a": "x"}) == "worker-0"
    assert routes.pick(header(Kind.GENERATE_END, 2), workers) == "worker-0"
    assert routes.pick(header(Kind.GENERATE_END, 2), workers) is None
    assert routes.pick(header(Kind.GENERATE, 0), {}) is None


def test_a_hierarchical_silos_generation_goes_to_the_worker_holding_its_adapter():
    routes = GenerationRoutes()
    workers = {"w1": "worker-1", "w0": "worker-0"}
    header = lambda kind, step: Header(kind, "run", "silo0", 0, step)  # noqa: E731
    assert routes.pick(header(Kind.GENERATE, 0), workers, assigned="w1") == "worker-1"
    assert routes.pick(header(Kind.GENERATE, 1), workers, assigned="w0") == "worker-1"  # follows its cache
    assert routes.pick(header(Kind.GENERATE_END, 2), workers) == "worker-1"
    assert routes.pick(header(Kind.GENERATE, 0), workers, assigned="gone") == "worker-0"  # a dead assignment

