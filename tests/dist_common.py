"""Model and data shared by the distributed test and its worker processes."""
import timm
import torch

from loco_timm import LocalLearner

GLOBAL_BATCH = 8


def build_learner():
    """LoCo on test_convnext with LayerNorm decoders: no batch statistics anywhere, so ranks can match 1 process."""
    torch.manual_seed(0)
    model = timm.create_model('test_convnext')
    return LocalLearner(model, mode='loco', top_unit=True, decoder_norm='layer', input_size=(3, 32, 32)).double()


def global_views():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))


def trainable_grads(learner):
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
            for n, p in learner.named_parameters() if p.requires_grad}
