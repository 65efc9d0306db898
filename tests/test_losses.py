"""NT-Xent against closed-form values and a NumPy reference."""
import math

import numpy as np
import pytest
import torch

from loco_timm import NTXentLoss, nt_xent_loss


def numpy_nt_xent(z1, z2, t):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        sims = [z[i] @ z[k] / t for k in range(n) if k != i]
        positive = z[i] @ z[(i + b) % n] / t
        total += -positive + math.log(sum(math.exp(s) for s in sims))
    return total / n


def test_identical_orthogonal_views_give_the_closed_form_value():
    # 2 images, views identical, images orthogonal: each anchor sees its positive at cosine 1 and two negatives
    # at cosine 0, so the loss is -log(e^(1/t) / (e^(1/t) + 2)).
    e = torch.eye(2)
    for t in (1.0, 0.5):
        expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
        assert nt_xent_loss(e, e.clone(), temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_loss_ignores_embedding_scale():
    e = torch.eye(2)
    assert nt_xent_loss(3 * e, 0.5 * e).item() == pytest.approx(nt_xent_loss(e, e).item(), rel=1e-6)


@pytest.mark.parametrize('batch,dim,t', [(2, 3, 0.1), (5, 8, 0.5), (16, 4, 1.0)])
def test_matches_numpy_reference(batch, dim, t):
    g = torch.Generator().manual_seed(batch)
    z1, z2 = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(numpy_nt_xent(z1.numpy(), z2.numpy(), t), rel=1e-5)


def test_bf16_embeddings_are_computed_in_float32():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    loss = nt_xent_loss(z1.bfloat16(), z2.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(nt_xent_loss(z1.bfloat16().float(), z2.bfloat16().float()).item(), rel=1e-6)


def test_module_form_equals_function():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    assert NTXentLoss(0.2)(z1, z2).item() == nt_xent_loss(z1, z2, 0.2).item()


@pytest.mark.parametrize('z1,z2,match', [
    (torch.randn(4, 8), torch.randn(3, 8), 'must both be'),
    (torch.randn(4), torch.randn(4), 'must both be'),
])
def test_mismatched_embeddings_are_a_value_error(z1, z2, match):
    with pytest.raises(ValueError, match=match):
        nt_xent_loss(z1, z2)


def test_non_positive_temperature_is_a_value_error():
    with pytest.raises(ValueError, match='temperature must be positive'):
        NTXentLoss(0.0)
