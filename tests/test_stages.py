"""split_stages: exact composition, default stage counts, parameter partition, num_stages, errors."""
import pytest
import timm
import torch
from torch import nn

from loco_timm import LocalLearner, register_stage_adapter, split_stages, supported_families

# (model name, create kwargs, default K, channels of the last stage or None)
FAMILIES = [
    ('test_resnet', {}, 4),            # ResNet
    ('resnet50d', {}, 4),              # ResNet-D (deep stem, avg-down)
    ('resnext26ts', {}, 4),            # ResNeXt in ByobNet form
    ('test_convnext', {}, 4),          # ConvNeXt
    ('test_efficientnet', {}, 4),      # EfficientNet (blocks.0 at stride 2 merged into the stem)
    ('mobilenetv3_small_050', {}, 4),  # MobileNetV3
    ('regnetx_002', {}, 4),            # RegNet
    ('test_byobnet', {}, 4),           # ByobNet
    ('test_nfnet', {}, 4),             # NormFreeNet
    ('test_vit', {'img_size': 32}, 4),  # ViT: 4 equal groups of its 6 blocks
]
HEAD_PREFIXES = ('fc.', 'head.', 'classifier.', 'conv_head.', 'norm_head.', 'fc_norm.', 'head_drop.')


def _model(name, kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


@pytest.fixture(scope='module', params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request):
    """(model, its default stages, default K) of each family, built and split once for the tests that only read
    them (evaluation mode, no gradients)."""
    name, kwargs, k = request.param
    model = _model(name, kwargs)
    return model, split_stages(model), k


@pytest.fixture(scope='module')
def resnet50():
    """timm's ResNet-50 (seeded, evaluation mode), built once for the tests that split it and only read it."""
    return _model('resnet50', {})


def test_stages_compose_to_forward_features_exactly(family):
    model, stages, k = family
    assert isinstance(stages, nn.ModuleList) and len(stages) == k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.forward_features(x)
        h = x
        for stage in stages:
            h = stage(h)
    assert torch.equal(h, expected)


def test_stages_partition_the_trunk_parameters(family):
    model, stages, _ = family
    owner = {}
    for i, stage in enumerate(stages):
        for p in stage.parameters():
            assert id(p) not in owner, 'a parameter belongs to two stages'
            owner[id(p)] = i
    left_out = [n for n, p in model.named_parameters() if id(p) not in owner]
    assert left_out and all(n.startswith(HEAD_PREFIXES) for n in left_out), left_out
    assert len(owner) + len(left_out) == len(list(model.parameters()))


def _blocks_of(model, stage, depth=2):
    """The model's parameter name prefixes (``layer1.0``, ``conv1``) whose parameters the stage holds."""
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted({'.'.join(names[id(p)].split('.')[:depth]) for p in stage.parameters()})


def test_resnet50_default_stages_are_stem_res2_then_res3_res4_res5(resnet50):
    model = resnet50
    stages = split_stages(model)
    assert [s.level for s in stages] == ['layer1', 'layer2', 'layer3', None]
    assert _blocks_of(model, stages[0]) == ['bn1.bias', 'bn1.weight', 'conv1.weight', 'layer1.0', 'layer1.1',
                                            'layer1.2']
    assert [{b.split('.')[0] for b in _blocks_of(model, s)} for s in stages[1:]] == [{'layer2'}, {'layer3'},
                                                                                     {'layer4'}]


def test_stages_share_modules_and_parameters_with_the_model():
    model = timm.create_model('test_resnet')
    stages = split_stages(model)
    assert stages[0].used_modules['layer1_0_conv1'] is model.layer1[0].conv1
    assert any(p is model.layer4[0].conv1.weight for p in stages[3].parameters())


def test_vit_first_stage_embeds_and_last_stage_norms():
    model = timm.create_model('test_vit', img_size=32)
    stages = split_stages(model)
    first = {id(p) for p in stages[0].parameters()}
    assert {id(model.pos_embed), id(model.cls_token), id(model.patch_embed.proj.weight)} <= first
    assert id(model.norm.weight) in {id(p) for p in stages[-1].parameters()}
    assert [len([b for b in _blocks_of(model, s) if b.startswith('blocks')]) for s in stages] == [2, 2, 1, 1]


@pytest.mark.parametrize('k', [1, 2, 3, 6])
def test_vit_num_stages_groups_blocks(k):
    model = _model('test_vit', {'img_size': 32})
    stages = split_stages(model, num_stages=k)
    assert len(stages) == k
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
        assert torch.equal(h, model.forward_features(x))


def test_fewer_stages_merge_neighbouring_default_stages(resnet50):
    model = resnet50
    stages = split_stages(model, num_stages=2)
    assert [sorted({b.split('.')[0] for b in _blocks_of(model, s)} - {'conv1', 'bn1'}) for s in stages] == \
        [['layer1', 'layer2'], ['layer3', 'layer4']]


def test_more_stages_split_the_longest_stage_at_a_block_boundary(resnet50):
    model = resnet50
    stages = split_stages(model, num_stages=6)  # the paper's "progressive" 6-stage ResNet-50
    assert [s.level for s in stages] == ['layer1', 'layer2.1', 'layer2', 'layer3.2', 'layer3', None]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
        assert torch.equal(h, model.forward_features(x))


@pytest.mark.parametrize('k', [0, 5, 99])
def test_num_stages_out_of_range_is_a_value_error(k):
    with pytest.raises(ValueError, match=f'num_stages={k} does not fit ResNet.*1 to 4 stages'):
        split_stages(timm.create_model('test_resnet'), num_stages=k)


def test_a_model_without_feature_info_is_a_one_line_value_error():
    class Custom(nn.Module):
        def forward_features(self, x):
            return x
    with pytest.raises(ValueError, match=r'^cannot split Custom: it has no feature_info .*upgrade timm') as err:
        split_stages(Custom())
    assert '\n' not in str(err.value)


def test_feature_info_naming_only_the_head_is_a_one_line_value_error():
    """timm 1.0.12's ConViT lists one level, its head (reduction 0), which forward_features never calls."""
    class HeadOnly(nn.Module):
        feature_info = [dict(module='head', num_chs=4, reduction=0)]

        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)

        def forward_features(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match=r'^cannot split HeadOnly: its feature_info names no module that '
                                         r'forward_features calls$'):
        split_stages(HeadOnly())


def test_an_untraceable_forward_is_a_value_error_naming_model_and_reason():
    class Branchy(nn.Module):
        feature_info = [dict(module='conv', num_chs=4, reduction=1)]

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward_features(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ValueError, match=r'^cannot split Branchy: torch.fx cannot trace its forward_features \(Trace'):
        split_stages(Branchy())


class ShapeBranchy(nn.Module):
    """Branches on shapes, as Gemma 4's ViT does (raw images or pre-patchified tokens; the feature map's width),
    and builds a tensor from traced sizes: torch.fx alone refuses it."""
    feature_info = [dict(module='a', num_chs=4, reduction=2), dict(module='b', num_chs=4, reduction=4)]

    def __init__(self, batch_branch=False):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, 2, 1)
        self.b = nn.Conv2d(4, 4, 3, 2, 1)
        self.batch_branch = batch_branch

    def forward_features(self, x):
        if x.ndim == 3:  # (B, N, C) tokens: never for images
            x = x.transpose(1, 2).reshape(x.shape[0], 3, 8, -1)
        h = self.a(x)
        weight = torch.ones(h.shape[0], 1, h.shape[-2], h.shape[-1])
        if h.shape[-1] > 8:
            h = h * weight * 2
        if self.batch_branch and x.shape[0] > 2:
            h = h + 1
        return self.b(h) + h.mean()


@pytest.mark.parametrize('side', [32, 8])
def test_a_forward_branching_on_shapes_is_traced_for_the_input_size(side):
    model = ShapeBranchy().eval()
    stages = split_stages(model, input_size=(3, side, side))
    assert len(stages) == 2
    for batch in (1, 3, 5):  # traced with batches of 2 and 3; the graph reads the batch size when it runs
        x = torch.randn(batch, 3, side, side)
        with torch.no_grad():
            assert torch.equal(stages[1](stages[0](x)), model.forward_features(x))
    learner = LocalLearner(model, 'gim', decoder='mlp', input_size=(3, side, side)).train()
    learner.step(torch.randn(4, 3, side, side), torch.randn(4, 3, side, side))
    assert all(p.grad is not None for p in model.parameters())


def test_stages_traced_for_one_input_size_refuse_another_in_one_line():
    stages = split_stages(ShapeBranchy(), input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r'^ShapeBranchy is split for 3x32x32 inputs \(its forward_features branches '
                                         r'on tensor shapes.*stage 0 got \(3, 16, 16\) instead of \(3, 32, 32\)'):
        stages[0](torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r'stage 1 got \(4, 8, 8\) instead of \(4, 16, 16\)'):
        stages[1](torch.randn(2, 4, 8, 8))


def test_tracing_for_shapes_leaves_batch_norm_statistics_as_they_were():
    """The fallback runs leaf modules on fake tensors for their shapes; BatchNorm in train mode updates its
    statistics in place there, which must not reach the model (the plain trace runs no module)."""
    class Normed(ShapeBranchy):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4))

    torch.manual_seed(0)
    model, twin = Normed().train(), Normed().train()
    twin.load_state_dict(model.state_dict())
    stages = split_stages(model, input_size=(3, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(stages[1](stages[0](x)), twin.forward_features(x), atol=1e-6)
    assert all(torch.allclose(a.float(), b.float()) for a, b in zip(model.state_dict().values(),
                                                                    twin.state_dict().values()))


def test_a_forward_branching_on_the_batch_size_is_refused():
    with pytest.raises(ValueError, match=r'^cannot split ShapeBranchy: its forward_features branches on the batch '
                                         r'size'):
        split_stages(ShapeBranchy(batch_branch=True), input_size=(3, 32, 32))


def test_a_traced_model_keeps_no_trace_constants_after_a_refused_trace():
    class ValueBranchy(ShapeBranchy):
        def forward_features(self, x):
            h = self.a(x) * torch.ones(1)  # a constant tensor the trace adds to the model
            return self.b(h) if h.sum() > 0 else h

    model = ValueBranchy()
    before = set(vars(model))
    with pytest.raises(ValueError, match='torch.fx cannot trace its forward_features'):
        split_stages(model, input_size=(3, 32, 32))
    assert set(vars(model)) == before


@pytest.mark.slow
@pytest.mark.skipif(not timm.is_model('gemma4_vit_167m'), reason='timm without Gemma 4')
def test_gemma4_vit_splits_at_its_encoder_blocks_and_trains_one_loco_step():
    """Gemma 4's forward_features branches on the input's rank, and its classifier names its levels relative to
    the encoder it wraps (blocks.3 for encoder.blocks.3)."""
    torch.manual_seed(0)
    model = timm.create_model('gemma4_vit_167m', depth=8, embed_dim=64, num_heads=2, head_dim=32,
                              intermediate_size=128, position_embedding_size=64).eval()
    learner = LocalLearner(model, 'loco', input_size=(3, 32, 32))
    assert [s.level for s in learner.stages] == ['encoder.blocks.1', 'encoder.blocks.3', 'encoder.blocks.5', None]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(learner(x)[-1], model.forward_features(x))
    learner.train()
    losses = learner.step(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    assert len(losses) == 3 and all(torch.isfinite(v) for v in losses.values())
    used = [p for n, p in model.named_parameters() if not n.startswith(('head.', 'norm.'))]
    assert all(p.grad is not None for p in used)


def test_a_model_that_is_no_timm_model_is_a_value_error():
    with pytest.raises(ValueError, match='cannot split Linear: it has no forward_features'):
        split_stages(nn.Linear(2, 2))


def test_a_registered_adapter_splits_its_family_into_chains_of_atoms():
    from loco_timm.core.stages import adapters

    class Chain(nn.Module):
        feature_info = [dict(module='blocks.0', num_chs=4, reduction=1), dict(module='blocks.1', num_chs=4,
                                                                               reduction=2)]

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.blocks = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 2, 1))

        def forward_features(self, x):
            return self.blocks(self.stem(x))

    before = dict(adapters._ADAPTERS)
    try:
        register_stage_adapter(Chain, 'Chain')(lambda m: [('stem', m.stem), ('blocks.0', m.blocks[0]),
                                                          ('blocks.1', m.blocks[1])])
        assert 'Chain' in supported_families()
        model = Chain()
        stages = split_stages(model)
        assert [type(s) for s in stages] == [nn.Sequential, nn.Sequential]
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(stages[1](stages[0](x)), model.forward_features(x))
    finally:
        adapters._ADAPTERS.clear()
        adapters._ADAPTERS.update(before)


def test_small_image_resnet_keeps_layer1_as_its_own_stage():
    import loco_timm  # noqa: F401  (registers loco_resnet18_small)
    stages = split_stages(timm.create_model('loco_resnet18_small'))
    assert [s.level for s in stages] == ['layer1', 'layer2', 'layer3', None]


def test_efficientnet_blocks_at_the_stem_stride_join_the_stem():
    model = timm.create_model('mobilenetv3_large_100')  # blocks.0 runs at stride 2
    stages = split_stages(model)
    assert [s.level for s in stages] == ['blocks.1', 'blocks.2', 'blocks.4', None]
    assert _blocks_of(model, stages[-1])[-1] == 'blocks.6'
    assert 'blocks.0' in _blocks_of(model, stages[0])
