"""The generic splitter on timm families without an adapter: composition, boundaries, layouts, one LoCo step.

Fast tests use timm's tiny test models and small hand-built models; the slow test runs the coverage protocol
(:func:`tools.coverage.check_model`) on the smallest model of every family that the committed coverage report
(benchmarks/results/coverage.json, written by benchmarks/coverage.py) lists as passing.
"""
import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from loco_timm import LocalLearner, split_stages
from loco_timm.core.stages import Boundary, detach_stage_output, stage_feature
from loco_timm.models.tags import list_hub_configs
from tools.coverage import check_model
from tools.macs import build, macs_and_params, recipe_of

REPORT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results' / 'coverage.json'
# tiny models of families the generic splitter handles: NHWC maps, hybrid conv/attention, relative position tokens
TINY = ['test_mambaout', 'test_maxvit', 'test_coatnet', 'test_vit_relpos', 'test_convnext2']


def _compose(stages, x):
    h = x
    for stage in stages:
        h = stage(h)
    return h


@pytest.mark.parametrize('name', TINY)
def test_tiny_families_compose_and_train_one_loco_step(name):
    if not timm.is_model(name):
        pytest.skip(f'{name} is not in timm {timm.__version__}')
    row = check_model(name, side=64)
    assert row['ok'], row.get('reason')
    assert row['stages'] >= 2 and row['composition']


def test_mambaout_features_are_nhwc_and_decoded_as_maps():
    learner = LocalLearner(timm.create_model('test_mambaout'), 'loco', input_size=(3, 64, 64))
    assert learner.layouts == ['NHWC'] * 4
    assert [row['layout'] for row in learner.summary()] == ['NHWC'] * 3
    assert [s[-1] for s in learner.stage_shapes] == [f['num_chs'] for f in learner.encoder.feature_info][:3] + [
        learner.encoder.num_features]


class SkipNet(nn.Module):
    """A value that skips over a cut: stage 2 reads stage 0's output as well as stage 1's."""
    feature_info = [dict(module='a', num_chs=4, reduction=2), dict(module='b', num_chs=4, reduction=4),
                    dict(module='c', num_chs=4, reduction=4)]

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU())
        self.c = nn.Conv2d(4, 4, 3, 1, 1)
        self.num_features = 4

    def forward_features(self, x):
        a = self.a(x)
        b = self.b(a)
        return self.c(b) + nn.functional.avg_pool2d(a, 2)


def test_a_value_that_skips_a_cut_crosses_it_detached_and_composition_is_exact():
    torch.manual_seed(0)
    model = SkipNet()
    stages = split_stages(model)
    assert len(stages) == 3
    x = torch.randn(2, 3, 16, 16)
    out0 = stages[0](x)
    out1 = stages[1](out0)
    assert isinstance(out1, Boundary) and len(out1.values) == 2  # b's output and the skipped a
    assert stage_feature(out1) is out1.values[out1.feature]
    assert torch.equal(_compose(stages, x), model.forward_features(x))
    detached = detach_stage_output(out1, requires_grad=True)
    assert all(v.is_leaf and v.requires_grad for v in detached.values)


def test_skip_value_gradients_stay_inside_their_units():
    """LoCo units (0, 1) and (1, 2): the skip from stage 0 to stage 2 carries unit (1, 2)'s gradient into stage 1
    only, never into stage 0; its gradient equals an autograd reference on the detached stage-1 input."""
    torch.manual_seed(0)
    learner = LocalLearner(SkipNet(), 'loco', decoder='mlp', input_size=(3, 16, 16)).double()
    v1, v2 = torch.randn(4, 3, 16, 16).double(), torch.randn(4, 3, 16, 16).double()
    learner.zero_grad(set_to_none=True)
    learner.step(v1, v2, units=[1])
    assert all(p.grad is None for p in learner.stages[0].parameters())
    got = [p.grad.clone() for p in learner.stages[1].parameters()]
    # reference: stage 1 and 2 on a detached copy of stage 0's output, loss of unit 1's decoder
    learner.zero_grad(set_to_none=True)
    h0 = learner.stages[0](torch.cat([v1, v2])).detach()
    out = learner.stages[2](learner.stages[1](h0))
    z = learner.decoders[1](out)
    learner.loss(z[:4], z[4:]).backward()
    want = [p.grad for p in learner.stages[1].parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _report_rows():
    if not REPORT.exists():
        return []
    return [r for r in json.loads(REPORT.read_text())['families'] if r.get('ok')]


# families whose smallest model has over 100 M parameters (DeepSeek's ViT took 10 minutes at its own size) or takes
# 5-24 s at its fixed input size: CI checks the same code at a reduced width or depth, or built by timm for a 64 px
# input (``img_size``; HaloNet with 2 px halo blocks, so that 64 px divides into them), with the same stages and
# layouts; benchmarks/coverage.py checks the models as they are
SMALL_INPUT = dict(img_size=64)
REDUCED = {
    'deepseek_vit': dict(depth=4, embed_dim=64, num_heads=2),
    'gemma4_vit': dict(depth=4, embed_dim=64, num_heads=2, head_dim=32, intermediate_size=128,
                       position_embedding_size=64),
    'beit': dict(depth=4, embed_dim=192, num_heads=3),
    'vision_transformer_sam': dict(depth=4, embed_dim=192, num_heads=3, global_attn_indexes=(1, 3)),
    'tnt': dict(depth=4),
    'sequencer': dict(layers=[1, 1, 1, 1]),
    'swin_transformer_v2': dict(depths=(1, 1, 1, 1)),
    'coat': dict(parallel_depth=1),
    'byoanet': dict(self_attn_kwargs=dict(block_size=2, halo_size=1)),
    **{family: SMALL_INPUT for family in ('cait', 'convit', 'gcvit', 'hiera', 'nest', 'swin_transformer',
                                          'swin_transformer_v2_cr', 'twins', 'vitamin', 'volo', 'xcit')},
}


@pytest.mark.slow
@pytest.mark.parametrize('row', _report_rows(), ids=lambda r: r['family'])
def test_every_supported_family_passes_the_protocol(row):
    """At 64 px where the model takes it (its own size otherwise), to keep CI short; the report used 128 px."""
    got = check_model(row['model'], side=64, model_args=REDUCED.get(row['family']))
    assert got['ok'], got.get('reason')
    assert got['stages'] == row['stages'] and got['layouts'] == row['layouts']


def test_stages_traced_in_eval_mode_follow_the_model_into_train_mode():
    """DropPath reads self.training inside the traced forward (and ConvNeXt has no batch norm): stages split in eval
    mode trace again for train mode,
    so with the same random draws they equal the eager model's stochastic forward."""
    model = timm.create_model('test_convnext', drop_path_rate=0.5, ls_init_value=1.0).eval()
    stages = split_stages(model)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        evaluated = _compose(stages, x)
        assert torch.allclose(evaluated, model.forward_features(x), atol=1e-5)
        model.train()
        torch.manual_seed(1)
        got = _compose(stages, x)
        torch.manual_seed(1)
        want = model.forward_features(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, evaluated, atol=1e-3)  # paths were dropped


def test_attention_bias_caches_are_neither_read_nor_polluted_by_the_trace():
    """LeViT caches its attention biases per device in eval mode: the trace must leave no traced value in the cache,
    and after training the eval stages use the new biases."""
    torch.manual_seed(0)
    model = timm.create_model('levit_128s').eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model.forward_features(x)  # fills the caches
    before = {id(m): dict(m.attention_bias_cache) for m in model.modules() if hasattr(m, 'attention_bias_cache')}
    stages = split_stages(model)
    after = {id(m): dict(m.attention_bias_cache) for m in model.modules() if hasattr(m, 'attention_bias_cache')}
    assert before and after == before  # the same tensors under the same keys, nothing traced added
    learner = LocalLearner(model, 'loco', decoder='mlp')
    optimizer = torch.optim.SGD(learner.parameters(), lr=1.0)
    learner.train()
    learner.step(torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224))
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(_compose(stages, x), model.forward_features(x), atol=1e-5)


@pytest.mark.parametrize('kwargs,prefix', [
    (dict(), 1),                                          # a class token
    (dict(reg_tokens=4), 5),                              # class + register tokens
    (dict(class_token=False, global_pool='avg'), 0),      # patch tokens only
])
def test_prefix_tokens_are_found_from_the_feature_as_timm_declares_them(kwargs, prefix):
    model = timm.create_model('test_vit', **kwargs)
    learner = LocalLearner(model, 'loco', input_size=(3, 32, 32))
    assert learner.prefix_tokens == [prefix] * len(learner.stages) == [model.num_prefix_tokens] * len(learner.stages)


@pytest.mark.parametrize('kwargs', [dict(), dict(reg_tokens=4, global_pool='avg', fc_norm=False)])
def test_the_last_stage_is_pooled_as_the_models_head_pools_it(kwargs):
    model = timm.create_model('test_vit', **kwargs)
    learner = LocalLearner(model, 'loco', input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():  # the last stage's readout is the model's own head input
        pooled = learner.pool(len(learner.stages) - 1, learner(x)[-1])
        torch.testing.assert_close(pooled, model.forward_head(model.forward_features(x), pre_logits=True))


def test_a_class_token_added_late_is_found_only_where_it_is():
    # CaiT's class token joins in its class-attention blocks, after the patch-token stages
    model = timm.create_model('cait_xxs24_224', img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2)
    learner = LocalLearner(model, 'loco', input_size=(3, 32, 32))
    assert learner.prefix_tokens[0] == 0 and learner.prefix_tokens[-1] == 1


def test_a_token_decoder_follows_the_stage_feature_not_the_family():
    # CrossViT's two branches have widths its first block's heads do not divide: the decoder's heads follow the width
    model = timm.create_model('crossvit_tiny_240', embed_dim=[36, 72], num_heads=[4, 4], depth=[[1, 1, 0]] * 3)
    if not getattr(model, 'feature_info', None):
        pytest.skip(f'CrossViT has no feature_info in timm {timm.__version__}')
    learner = LocalLearner(model, 'loco', input_size=(3, 240, 240))
    assert learner.prefix_tokens[0] == (1, 1) and learner.layouts[0] == ('NLC', 'NLC')
    losses = learner.step(torch.randn(2, 3, 240, 240), torch.randn(2, 3, 240, 240))
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_crossvit_18_wraps_and_trains_one_step():
    learner = LocalLearner(timm.create_model('crossvit_18_240'), 'loco')
    losses = learner.step(torch.randn(2, 3, 240, 240), torch.randn(2, 3, 240, 240))
    assert len(losses) == len(learner.units) and all(torch.isfinite(v) for v in losses.values())


# the members of the cross-family study (benchmarks/families.py): the Fashion-MNIST tags of timm's own architectures
MEMBERS = sorted(c.name for c in list_hub_configs() if c.name.endswith('.simclr_fmnist')
                 and not c.architecture.startswith('loco_'))
REFERENCE = 'loco_resnet18_small.simclr_fmnist'  # the main job's tag: the compute every member is matched to


def test_the_study_has_members_of_six_timm_families_besides_resnet():
    modules = {m for m in timm.list_modules() for tag in MEMBERS if tag.split('.')[0] in timm.list_models(module=m)}
    assert len(modules) >= 6 and 'resnet' not in modules, modules


@pytest.mark.parametrize('tag', MEMBERS)
def test_family_members_are_compute_matched_and_train_a_step_in_every_mode(tag):
    """0.5x-2x the reference's multiply-adds per image; four stages; a finite step of E2E, GIM and LoCo at 8 images."""
    macs, reference = macs_and_params(tag)[0], macs_and_params(REFERENCE)[0]
    assert 0.5 <= macs / reference <= 2.0, (tag, macs, reference)
    size = recipe_of(tag).image_size
    x = torch.randn(8, 1, size, size, generator=torch.Generator().manual_seed(0))
    for mode, decoder in (('e2e', 'mlp'), ('gim', 'conv'), ('loco', 'conv')):
        torch.manual_seed(0)
        learner = LocalLearner(build(tag), mode, decoder=decoder, input_size=(1, size, size)).train()
        assert len(learner.stages) == 4
        losses = learner.step(x, x.flip(-1))
        assert all(torch.isfinite(v) for v in losses.values()), (tag, mode, losses)
