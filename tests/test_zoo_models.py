"""The paper's other encoders as timm models: ShuffleNet v2-50 and the progressive ResNet-50.

Parameter and multiply-add counts are checked against counts computed here from the layouts the papers give
(independently of the model code), the timm protocol (features_only, forward_intermediates, num_classes=0,
reset_classifier), the paper's stages, and one training step per mode."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import loco_timm  # noqa: F401  (registers the models)
from loco_timm import LocalLearner, split_stages


def _conv(cin, cout, k, size, groups=1):
    """(multiply-adds, parameters incl. its BN) of a k x k convolution producing size x size maps."""
    weights = cin // groups * cout * k * k
    return weights * size * size, weights + 2 * cout


def _shufflenet_spec(side=224):
    """ShuffleNet v2-50 from its layout: conv1 3x3/2 64; max pool; stages (244, 488, 976, 1952) x (3, 4, 6, 3)
    units; conv6 1x1 2048; fc 1000."""
    layers = [_conv(3, 64, 3, side // 2)]
    cin, size = 64, side // 4
    for i, (c, n) in enumerate(zip((244, 488, 976, 1952), (3, 4, 6, 3))):
        out = size if i == 0 else size // 2
        half = c // 2
        layers += [_conv(cin, cin, 3, out, groups=cin), _conv(cin, half, 1, out),  # second branch
                   _conv(cin, half, 1, size), _conv(half, half, 3, out, groups=half), _conv(half, half, 1, out)]
        basic = [_conv(half, half, 1, out), _conv(half, half, 3, out, groups=half), _conv(half, half, 1, out)]
        layers += basic * (n - 1)
        cin, size = c, out
    layers.append(_conv(1952, 2048, 1, size))
    macs = sum(m for m, _ in layers) + 2048 * 1000
    return macs, sum(p for _, p in layers) + 2048 * 1000 + 1000


def _presnet_spec():
    """Progressive ResNet-50 from the paper's layout with the docstring's choices (224 px)."""
    layers = [_conv(3, 32, 7, 112)]
    cin, previous = 32, 56
    stages = [(56, None, 1, 56), (96, None, 1, 36), (576, 144, 1, 24), (1024, 256, 2, 16), (2048, 512, 16, 12),
              (4096, 1024, 128, 8)]
    for cout, mid, g, size in stages:
        for block in range(3):
            c_in = cin if block == 0 else cout
            if mid is None:
                layers += [_conv(c_in, cout, 3, size), _conv(cout, cout, 3, size)]
            else:
                first_size = previous if block == 0 else size  # the first 1x1 runs before the resize
                layers += [_conv(c_in, mid, 1, first_size, g), _conv(mid, mid, 3, size, g),
                           _conv(mid, cout, 1, size, 1 if block == 0 else g)]
            if block == 0 and c_in != cout:
                layers.append(_conv(c_in, cout, 1, size))
        cin, previous = cout, size
    return sum(m for m, _ in layers) + 4096 * 1000, sum(p for _, p in layers) + 4096 * 1000 + 1000


@pytest.fixture(scope='module')
def built():
    """``built(name)``: the full-width model in evaluation mode, built once for the tests that only read it."""
    models = {}

    def get(name):
        if name not in models:
            models[name] = timm.create_model(name, pretrained=False).eval()
        return models[name]
    return get


@pytest.mark.parametrize('name, spec, paper_gmacs', [('loco_shufflenet_v2_50', _shufflenet_spec, 2.3),
                                                     ('loco_presnet50', _presnet_spec, 4.16)])
def test_parameters_and_multiply_adds_match_the_layout(built, name, spec, paper_gmacs):
    model = built(name)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    macs, params = counter.get_total_flops() / 2, sum(p.numel() for p in model.parameters())
    want_macs, want_params = spec()
    assert abs(macs / want_macs - 1) < 0.03, (macs, want_macs)
    assert abs(params / want_params - 1) < 0.03, (params, want_params)
    if name == 'loco_shufflenet_v2_50':  # the ShuffleNet V2 paper's 2.3 G; presnet: see its docstring
        assert abs(macs / 1e9 / paper_gmacs - 1) < 0.03


def test_shufflenet_v2_50_has_50_convolutions_on_its_main_path(built):
    """conv1, 16 units x 3 on the main branch, conv6 (the downsampling units' second branches and fc not counted)."""
    model = built('loco_shufflenet_v2_50')
    main = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and 'branch_proj' not in n]
    assert len(main) == 50


@pytest.mark.parametrize('name, shapes', [
    ('loco_shufflenet_v2_50', [(244, 16), (488, 8), (976, 4), (2048, 2)]),
    ('loco_presnet50', [(56, 16), (96, 10), (576, 7), (1024, 5), (2048, 4), (4096, 3)]),
])
def test_timm_protocol(name, shapes):
    """features_only, forward_intermediates, num_classes=0 and reset_classifier behave as for timm's models (64 px:
    each progressive stage resizes by its ratio at 224 px, rounded: 16 -> 10 -> 7 -> 5 -> 4 -> 3)."""
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model(name, num_classes=0).eval()
    with torch.no_grad():
        assert model(x).shape == (2, shapes[-1][0])
        got = [tuple(t.shape[1:]) for t in model.forward_intermediates(x, intermediates_only=True)]
        assert got == [(c, s, s) for c, s in shapes]
        final, taken = model.forward_intermediates(x, indices=[0, len(shapes) - 1])
        assert torch.equal(final, taken[-1]) and torch.equal(final, model.forward_features(x))
        features = timm.create_model(name, features_only=True).eval()(x)
    assert [tuple(t.shape[1:]) for t in features] == [(c, s, s) for c, s in shapes]
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model(x).shape == (2, 7)
    pruned = timm.create_model(name).eval()
    assert pruned.prune_intermediate_layers([1]) == [1]
    with torch.no_grad():
        kept = pruned.forward_intermediates(x, intermediates_only=True)
    assert [tuple(t.shape[1:]) for t in kept] == [(c, s, s) for c, s in shapes[:2]] and len(pruned.stages) == 2


@pytest.mark.parametrize('name, stages', [
    ('loco_shufflenet_v2_50', ['stages.0', 'stages.1', 'stages.2', 'conv6']),
    ('loco_presnet50', [f'stages.{i}' for i in range(6)]),
])
def test_split_into_the_papers_stages(built, name, stages):
    """ShuffleNet v2-50: conv1 + stage 2, stage 3, stage 4, stage 5 + conv6; presnet: stem + res2, res3 ... res7."""
    model = built(name)
    split = split_stages(model)
    assert [s.level for s in split[:-1]] == stages[:-1] and len(split) == len(stages)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = x
        for stage in split:
            y = stage(y)
        assert torch.allclose(y, model.forward_features(x), atol=1e-5)
    if name == 'loco_shufflenet_v2_50':
        assert 'conv6_conv' in split[-1].used_modules and 'conv1_conv' in split[0].used_modules


@pytest.mark.parametrize('name', ['loco_shufflenet_v2_50', 'loco_presnet50'])
@pytest.mark.parametrize('mode', ['loco', 'gim', 'e2e'])
def test_one_step_in_each_mode_trains_every_parameter(name, mode):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0)
    learner = LocalLearner(model, mode, decoder="conv" if mode != "e2e" else "mlp", input_size=(3, 32, 32))
    learner.train()
    losses = learner.step(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert len(losses) == {'loco': len(learner.stages) - 1, 'gim': len(learner.stages), 'e2e': 1}[mode]
    assert all(torch.isfinite(v) for v in losses.values())
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
