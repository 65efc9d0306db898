"""split_stages: exact composition, default stage counts, parameter partition, num_stages, errors."""
import pytest
import timm
import torch
from torch import nn

from loco_timm import split_stages, supported_families

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


@pytest.mark.parametrize('name,kwargs,k', FAMILIES, ids=[f[0] for f in FAMILIES])
def test_stages_compose_to_forward_features_exactly(name, kwargs, k):
    model = _model(name, kwargs)
    stages = split_stages(model)
    assert isinstance(stages, nn.ModuleList) and len(stages) == k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.forward_features(x)
        h = x
        for stage in stages:
            h = stage(h)
    assert torch.equal(h, expected)


@pytest.mark.parametrize('name,kwargs,k', FAMILIES, ids=[f[0] for f in FAMILIES])
def test_stages_partition_the_trunk_parameters(name, kwargs, k):
    model = _model(name, kwargs)
    owner = {}
    for i, stage in enumerate(split_stages(model)):
        for p in stage.parameters():
            assert id(p) not in owner, 'a parameter belongs to two stages'
            owner[id(p)] = i
    left_out = [n for n, p in model.named_parameters() if id(p) not in owner]
    assert left_out and all(n.startswith(HEAD_PREFIXES) for n in left_out), left_out
    assert len(owner) + len(left_out) == len(list(model.parameters()))


def test_resnet50_default_stages_are_stem_res2_then_res3_res4_res5():
    stages = split_stages(timm.create_model('resnet50'))
    first = [name.split('_')[0] for name in stages[0]._modules]
    assert first == ['conv1', 'bn1', 'act1', 'maxpool', 'layer1', 'layer1', 'layer1']
    assert [{n.split('_')[0] for n in s._modules} for s in stages[1:]] == [{'layer2'}, {'layer3'}, {'layer4'}]


def test_stages_share_modules_with_the_model():
    model = timm.create_model('test_resnet')
    stages = split_stages(model)
    assert stages[0].conv1 is model.conv1 and stages[3].layer4_0 is model.layer4[0]


def test_vit_first_stage_embeds_and_last_stage_norms():
    model = timm.create_model('test_vit', img_size=32)
    stages = split_stages(model)
    assert list(stages[0]._modules)[0] == 'embed' and list(stages[-1]._modules)[-1] == 'norm'
    embed_params = {id(p) for p in stages[0].embed.parameters()}
    assert {id(model.pos_embed), id(model.cls_token), id(model.patch_embed.proj.weight)} <= embed_params
    assert [len([n for n in s._modules if n.startswith('blocks')]) for s in stages] == [2, 2, 1, 1]


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


def test_fewer_stages_merge_neighbouring_default_stages():
    stages = split_stages(timm.create_model('resnet50'), num_stages=2)
    assert [sorted({n.split('_')[0] for n in s._modules} - {'conv1', 'bn1', 'act1', 'maxpool'}) for s in stages] == \
        [['layer1', 'layer2'], ['layer3', 'layer4']]


def test_more_stages_split_the_longest_stage_at_a_block_boundary():
    model = _model('resnet50', {})
    stages = split_stages(model, num_stages=6)  # the paper's "progressive" 6-stage ResNet-50
    assert len(stages) == 6
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


def test_unknown_family_is_a_value_error_naming_model_and_families():
    class Custom(nn.Module):
        def forward_features(self, x):
            return x
    with pytest.raises(ValueError, match=r'cannot split Custom into sequential stages: supported families are .*ResNet'):
        split_stages(Custom())


def test_swin_is_not_supported_with_a_clear_error():
    with pytest.raises(ValueError, match='cannot split SwinTransformer'):
        split_stages(timm.create_model('swin_tiny_patch4_window7_224', depths=(1, 1, 1, 1), embed_dim=32,
                                       num_heads=(1, 1, 1, 1)))


def test_supported_families_names_the_required_families():
    names = ' '.join(supported_families())
    for family in ('ResNet', 'ConvNeXt', 'EfficientNet', 'MobileNetV3', 'RegNet', 'ByobNet', 'VisionTransformer'):
        assert family in names


def test_small_image_resnet_keeps_layer1_as_its_own_stage():
    import loco_timm  # noqa: F401  (registers loco_resnet18_small)
    stages = split_stages(timm.create_model('loco_resnet18_small'))
    assert [list(s._modules)[-1] for s in stages] == ['layer1_1', 'layer2_1', 'layer3_1', 'layer4_1']


def test_efficientnet_blocks_at_the_stem_stride_join_the_stem():
    stages = split_stages(timm.create_model('mobilenetv3_large_100'))  # blocks.0 runs at stride 2
    assert [list(s._modules)[-1] for s in stages] == ['blocks_1_1', 'blocks_2_2', 'blocks_4_1', 'blocks_6_0']
