"""Secure aggregation: the masked sum equals plain FedAvg, and no upload shows its silo's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from shared.crypto import secure_agg as sa

RUN = "run-sa"


def _silos(n: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    keys = {f"silo{i}": X25519PrivateKey.generate() for i in range(n)}
    params = {s: [torch.randn(dim // 2, generator=gen), torch.randn(dim - dim // 2, generator=gen) * 3] for s in keys}
    weights = {s: 50 + 37 * i for i, s in enumerate(keys)}
    publics = {s: k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for s, k in keys.items()}
    return keys, params, weights, publics.__getitem__


def _uploads(keys, params, weights, public_of, participants, rnd=0, attempt=0):
    return {s: sa.masked_upload(params[s], weights[s], s, keys[s], public_of, RUN, rnd, attempt, participants)
            for s in participants}


def test_masked_sum_equals_plain_fedavg():
    keys, params, weights, public_of = _silos(4, 5000)
    participants = sorted(keys)
    total = sa.sum_uploads(list(_uploads(keys, params, weights, public_of, participants).values()))
    secure = sa.average_from_sum(total)
    plain = sa.plain_fedavg([sa.flatten(params[s]) for s in participants], [weights[s] for s in participants])
    assert torch.max(torch.abs(secure - plain)).item() <= 1e-6


def test_no_upload_reveals_its_silo():
    keys, params, weights, public_of = _silos(3, 20000)
    ups = _uploads(keys, params, weights, public_of, sorted(keys))
    for s, up in ups.items():
        real = sa.quantize(np.append(sa.flatten(params[s]).numpy() * weights[s], float(weights[s])))
        assert not np.array_equal(up.numpy().view(np.uint64), real)
        # Read as numbers, the upload is noise: no correlation with the real weighted parameters.
        as_float = sa.dequantize(up.numpy().view(np.uint64))[:-1]
        corr = np.corrcoef(as_float, sa.flatten(params[s]).numpy())[0, 1]
        assert abs(corr) < 0.05, (s, corr)
        # Not even the weight element (the last) survives unmasked.
        assert up[-1].item() != real.view(np.int64)[-1]


def test_dropout_remask_with_smaller_set():
    keys, params, weights, public_of = _silos(3, 1000)
    first = _uploads(keys, params, weights, public_of, ["silo0", "silo1", "silo2"], attempt=0)
    # silo2 drops before the commit point: the others mask again for {silo0, silo1}, attempt 1.
    second = _uploads(keys, params, weights, public_of, ["silo0", "silo1"], attempt=1)
    avg = sa.average_from_sum(sa.sum_uploads(list(second.values())))
    plain = sa.plain_fedavg([sa.flatten(params[s]) for s in ("silo0", "silo1")], [weights["silo0"], weights["silo1"]])
    assert torch.max(torch.abs(avg - plain)).item() <= 1e-6
    # The first attempt's uploads of the survivors do not combine into the answer: their masks
    # involved silo2 and do not cancel without it.
    stale = sa.dequantize(sa.sum_uploads([first["silo0"], first["silo1"]]).numpy().view(np.uint64))
    assert np.max(np.abs(stale[:-1] / max(abs(stale[-1]), 1.0) - plain.numpy())) > 1.0


def test_masks_bind_round_and_attempt():
    keys, params, weights, public_of = _silos(2, 64)
    a = sa.masked_upload(params["silo0"], 7, "silo0", keys["silo0"], public_of, RUN, 0, 0, ["silo0", "silo1"])
    b = sa.masked_upload(params["silo0"], 7, "silo0", keys["silo0"], public_of, RUN, 1, 0, ["silo0", "silo1"])
    c = sa.masked_upload(params["silo0"], 7, "silo0", keys["silo0"], public_of, RUN, 0, 1, ["silo0", "silo1"])
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_refusals():
    keys, params, weights, public_of = _silos(2, 10)
    with pytest.raises(sa.SecureAggError, match="too_few"):
        sa.masked_upload(params["silo0"], 1, "silo0", keys["silo0"], public_of, RUN, 0, 0, ["silo0"])
    with pytest.raises(sa.SecureAggError, match="not_participant"):
        sa.masked_upload(params["silo0"], 1, "silo0", keys["silo0"], public_of, RUN, 0, 0, ["silo1", "silo2"])
    with pytest.raises(sa.SecureAggError, match="shape"):
        sa.sum_uploads([torch.zeros(4, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)])
    with pytest.raises(sa.SecureAggError, match="overflow"):
        sa.quantize(np.array([1e12]))


def test_unflatten_round_trip():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    target = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    sa.unflatten_into(target, sa.flatten(params))
    assert all(torch.equal(a, b) for a, b in zip(params, target))
    with pytest.raises(sa.SecureAggError):
        sa.unflatten_into(target, torch.zeros(3, dtype=torch.float64))
