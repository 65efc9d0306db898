"""Independent references for the tests: plain autograd, no loco_timm loss or stage code."""
import torch


def ref_nt_xent(z1, z2, t):
    """SimCLR NT-Xent written out: per anchor, -log softmax of its positive among all other embeddings."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n, b = z.shape[0], z1.shape[0]
    losses = []
    for i in range(n):
        others = torch.cat([z[:i], z[i + 1:]])
        positive = (i + b) % n
        positive_in_others = positive if positive < i else positive - 1
        logits = others @ z[i] / t
        losses.append(torch.logsumexp(logits, 0) - logits[positive_in_others])
    return torch.stack(losses).mean()


def resnet_stage_fns(model):
    """The paper's ResNet stages written by hand: S1 = stem + res2, S2 = res3, S3 = res4, S4 = res5."""
    def stem_res2(x):
        return model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))
    return [stem_res2, model.layer2, model.layer3, model.layer4]


def resnet_stage_params(model):
    """Parameters of each hand-written ResNet stage, by name."""
    prefixes = [('conv1.', 'bn1.', 'layer1.'), ('layer2.',), ('layer3.',), ('layer4.',)]
    return [[p for n, p in model.named_parameters() if n.startswith(pre)] for pre in prefixes]


def views(batch=4, size=32, seed=1, dtype=torch.float64):
    """Two seeded random view batches (B, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, size, size, generator=g, dtype=dtype) for _ in range(2))


def grads(params):
    """The parameters' ``.grad`` (zeros where None)."""
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def assert_close(actual, expected):
    """Gradients equal up to float64 rounding."""
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def ref_unit_loss(learner, unit_index, fns, view1, view2, t):
    """A unit's loss over hand-written stage functions ``fns``: input detached, its stages, decoder, NT-Xent."""
    first, last = learner.units[unit_index]
    h = torch.cat([view1, view2])
    with torch.no_grad():
        for fn in fns[:first]:
            h = fn(h)
    h = h.detach()
    for fn in fns[first:last + 1]:
        h = fn(h)
    z = learner.decoders[unit_index](h)
    return ref_nt_xent(z[:len(view1)], z[len(view1):], t)
