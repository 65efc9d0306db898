"""Every ``loco_*`` architecture passes the checks timm runs on its own models (modelled on timm's
``tests/test_models.py``): forward, backward, default configs, ``features_only``, ``forward_intermediates``, FX feature
extraction, TorchScript, and construction on another device and dtype (timm's ``device``/``dtype`` arguments).

Inputs are smaller than timm's where the check does not depend on the size (these models are 25 M parameters and the
machine has two cores); the default-config check runs at the default input size, as timm's does.
"""
import pytest
import timm
import torch
from timm.layers import set_layer_config
from timm.models import get_pretrained_cfg_value
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import loco_timm  # noqa: F401  (registers the loco_* models)
from loco_timm.models import ARCHITECTURES

NAMES = sorted(ARCHITECTURES)
SIDE = {'loco_resnet18_small': 28}  # the small-image model at its own size; the others at 64 px


def _input(name: str, batch: int = 1) -> torch.Tensor:
    chans = get_pretrained_cfg_value(name, 'input_size')[0]
    side = SIDE.get(name, 64)
    return torch.randn(batch, chans, side, side, generator=torch.Generator().manual_seed(0))


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights in every wrapper
    return timm.create_model(name, **kwargs).eval()


@pytest.mark.parametrize('name', NAMES)
def test_forward(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(_input(name))
    assert out.shape == (1, model.num_classes) and not torch.isnan(out).any()


@pytest.mark.parametrize('name', NAMES)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(_input(name, batch=2))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert out.shape[-1] == 42 and not missing


@pytest.mark.parametrize('name', NAMES)
def test_default_cfg_matches_the_model(name):
    model = timm.create_model(name).eval()
    cfg, pooled = model.pretrained_cfg, model.get_classifier().in_features  # num_features x the pooling's outputs
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        assert tuple(model.forward_features(x).shape[-2:]) == tuple(cfg['pool_size'])
        model.reset_classifier(0)
        assert model(x).shape == (1, pooled) and pooled % model.num_features == 0
        model.reset_classifier(0, '')
        assert tuple(model(x).shape[-2:]) == tuple(cfg['pool_size'])
    state = model.state_dict()
    assert f'{cfg["first_conv"]}.weight' in state
    assert f'{cfg["classifier"]}.weight' in timm.create_model(name).state_dict()


@pytest.mark.parametrize('name', NAMES)
def test_features_only_gives_the_feature_info_channels(name):
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        outputs = model(_input(name))
    assert len(outputs) >= 4 and [o.shape[1] for o in outputs] == model.feature_info.channels()


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates_match_features_only_and_forward_features(name):
    model, features = _create(name), _create(name, features_only=True)  # the same weights
    x = _input(name)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        expected = features(x)
    assert [tuple(t.shape) for t in intermediates][-len(expected):] == [tuple(t.shape) for t in expected]


@pytest.mark.parametrize('name', NAMES)
def test_fx_traced_model_and_features_equal_eager(name):
    model = _create(name)
    _, eval_nodes = get_graph_node_names(model)
    traced = create_feature_extractor(model, [eval_nodes[-1]]).eval()
    fx_features, hooks = (_create(name, features_only=True, feature_cls=cls) for cls in ('fx', 'hook'))
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(list(traced(x).values())[-1], model(x))
        for got, want in zip(fx_features(x), hooks(x), strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize('name', NAMES)
def test_torchscript_equals_eager(name):
    with set_layer_config(scriptable=True):
        model = timm.create_model(name).eval()
    scripted = torch.jit.script(model)
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize('name', NAMES)
def test_builds_on_the_meta_device_and_in_another_dtype(name):
    meta = timm.create_model(name, device='meta')
    assert {p.device.type for p in meta.parameters()} == {'meta'}
    half = timm.create_model(name, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
