"""LocalLearner: units, decoders, and gradient semantics against hand-written autograd references."""

import pytest
import timm
import torch
from reference import assert_close, grads, ref_nt_xent, ref_unit_loss, resnet_stage_fns, resnet_stage_params, views

from loco_timm import LocalLearner, make_units

T = 0.1
DTYPE = torch.float64  # gradient comparisons in float64: differences are then rounding noise far below 1e-9


def _learner(mode, name='test_resnet', **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **({'img_size': 32} if 'vit' in name else {}))
    return LocalLearner(model, mode=mode, input_size=(3, 32, 32), temperature=T, **kwargs).to(DTYPE)


def _ref_unit_grads(learner, view1, view2, unit_index):
    """Reference: detach at the unit's input, forward its stages, decoder, NT-Xent; autograd.grad."""
    model = learner.encoder
    fns, stage_params = resnet_stage_fns(model), resnet_stage_params(model)
    loss = ref_unit_loss(learner, unit_index, fns, view1, view2, T)
    params = [p for ps in stage_params for p in ps] + list(learner.decoders[unit_index].parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def test_units_follow_the_paper():
    assert make_units('e2e', 4) == [(0, 3)]
    assert make_units('gim', 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert make_units('loco', 4) == [(0, 1), (1, 2), (2, 3)]
    assert make_units('loco', 4, top_unit=True) == [(0, 1), (1, 2), (2, 3), (3, 3)]


def test_learner_exposes_encoder_stages_units_and_decoders():
    learner = _learner('loco')
    assert learner.encoder.__class__.__name__ == 'ResNet' and len(learner.stages) == 4
    assert learner.stages[0].used_modules['layer1_0_conv1'] is learner.encoder.layer1[0].conv1
    assert len(learner.decoders) == len(learner.units) == 3
    # the stages are not registered twice: the state dict holds encoder and decoders only
    assert {k.split('.')[0] for k in learner.state_dict()} == {'encoder', 'decoders'}


def test_default_decoders_are_conv_for_local_modes_and_mlp_for_e2e():
    assert _learner('loco').config['decoder'] == 'conv'
    assert _learner('gim').config['decoder'] == 'conv'
    assert _learner('e2e').config['decoder'] == 'mlp'
    conv = _learner('loco').decoders[0]
    assert conv.block.conv2.stride == (2, 2) and conv.block.downsample is not None  # stride-2 residual block
    assert conv.mlp.fc1.in_features == conv.mlp.fc1.out_features  # hidden = input width
    assert conv.mlp.fc2.out_features == 128


def test_token_stages_get_a_transformer_block_as_conv_analogue():
    learner = _learner('loco', name='test_vit')
    assert type(learner.decoders[0].block).__name__ == 'Block'
    assert learner.decoders[0].pool.kind == 'token'


def test_summary_reports_decoder_params_and_flops():
    rows = _learner('loco').summary()
    assert [r['unit'] for r in rows] == [(0, 1), (1, 2), (2, 3)]
    assert all(r['params'] > 0 and r['flops'] > 0 for r in rows)


@pytest.mark.parametrize('mode', ['loco', 'gim', 'e2e'])
def test_single_unit_gradients_equal_the_autograd_reference(mode):
    learner = _learner(mode)
    view1, view2 = views()
    stage_params = resnet_stage_params(learner.encoder)
    for j, (first, last) in enumerate(learner.units):
        learner.zero_grad(set_to_none=True)
        ref_loss, ref = _ref_unit_grads(learner, view1, view2, j)
        losses = learner.step(view1, view2, units=[j])
        assert list(losses) == [j]
        torch.testing.assert_close(losses[j], ref_loss.detach(), rtol=1e-9, atol=1e-12)
        params = [p for ps in stage_params for p in ps] + list(learner.decoders[j].parameters())
        assert_close(grads(params), ref)
        for k, ps in enumerate(stage_params):  # exactly the unit's stages receive gradient
            nonzero = any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)
            assert nonzero == (first <= k <= last), (j, k)
        for i, dec in enumerate(learner.decoders):
            assert all(p.grad is None for p in dec.parameters()) == (i != j)


def test_loco_lower_stage_gets_only_the_gradient_through_its_upper_stage():
    learner = _learner('loco')
    view1, view2 = views()
    model = learner.encoder
    fns, stage_params = resnet_stage_fns(model), resnet_stage_params(model)
    learner.step(view1, view2, units=[1])  # unit (1, 2)
    h1 = fns[0](torch.cat([view1, view2])).detach()
    h2 = fns[1](h1)
    h3 = fns[2](h2)
    z = learner.decoders[1](h3)
    loss = ref_nt_xent(z[:4], z[4:], T)
    grad_h2 = torch.autograd.grad(loss, h2, retain_graph=True)[0]
    expected = torch.autograd.grad(h2, stage_params[1], grad_h2)
    assert_close(grads(stage_params[1]), expected)
    assert all(p.grad is None for p in stage_params[0])


@pytest.mark.parametrize('mode', ['loco', 'gim'])
def test_sum_of_single_unit_gradients_equals_all_units(mode):
    learner = _learner(mode, top_unit=True) if mode == 'loco' else _learner(mode)
    view1, view2 = views()
    params = list(learner.parameters())
    total = [torch.zeros_like(p) for p in params]
    for j in range(len(learner.units)):
        learner.zero_grad(set_to_none=True)
        learner.step(view1, view2, units=[j])
        total = [t + g for t, g in zip(total, grads(params))]
    learner.zero_grad(set_to_none=True)
    losses = learner.step(view1, view2)
    assert sorted(losses) == list(range(len(learner.units)))
    assert_close(grads(params), total)


@pytest.mark.parametrize('name', ['test_resnet', 'test_convnext', 'test_vit', 'test_efficientnet'])
def test_e2e_equals_plain_simclr_backprop(name):
    learner = _learner('e2e', name=name)
    view1, view2 = views()
    model, decoder = learner.encoder, learner.decoders[0]
    z = decoder(model.forward_features(torch.cat([view1, view2])))
    params = [p for p in learner.parameters()]
    loss = ref_nt_xent(z[:4], z[4:], T)
    ref = [g if g is not None else torch.zeros_like(p)
           for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]
    learner.zero_grad(set_to_none=True)
    losses = learner.step(view1, view2)
    torch.testing.assert_close(losses[0], loss.detach(), rtol=1e-9, atol=1e-12)
    assert_close(grads(params), ref)


def test_custom_units_share_more_stages():
    learner = _learner('loco', units=[(0, 2), (1, 3)])
    view1, view2 = views()
    learner.step(view1, view2, units=[1])
    stage_params = resnet_stage_params(learner.encoder)
    _, ref = _ref_unit_grads(learner, view1, view2, 1)
    assert_close(grads([p for ps in stage_params for p in ps]), ref[:sum(len(ps) for ps in stage_params)])


def test_backward_callable_is_called_once_per_unit_with_its_loss():
    learner = _learner('loco')
    seen = []

    def backward(loss):
        seen.append(loss.detach().clone())
        (loss * 2).backward()  # e.g. a loss scaler
    view1, view2 = views()
    losses = learner.step(view1, view2, backward=backward)
    assert [s.item() for s in seen] == [losses[j].item() for j in range(3)]
    params = list(learner.parameters())
    doubled = grads(params)
    learner.zero_grad(set_to_none=True)
    learner.step(view1, view2)
    assert_close(doubled, [2 * g for g in grads(params)])


def test_step_under_bf16_autocast_runs_stages_in_bf16():
    learner = _learner('loco').float()
    view1, view2 = views(dtype=torch.float32)
    dtypes = []
    hook = learner.stages[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = learner.step(view1, view2)
    hook.remove()
    assert dtypes == [torch.bfloat16]
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in learner.stages[1].parameters())


def _forwards_per_stage(learner):
    """How many times each stage's forward runs during one step."""
    calls = [0] * len(learner.stages)
    for k, stage in enumerate(learner.stages):
        stage.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
    learner.step(*views())
    return calls


def test_each_stage_runs_forward_once_per_step():
    assert _forwards_per_stage(_learner('loco', top_unit=True)) == [1, 1, 1, 1]


@pytest.mark.parametrize('kwargs,match', [
    (dict(mode='bp'), "unknown mode 'bp'"),
    (dict(decoder='transformer'), "unknown decoder 'transformer'"),
    (dict(decoder_norm='group'), "unknown decoder_norm 'group'"),
    (dict(num_stages=9), 'num_stages=9 does not fit'),
    (dict(units=[(0, 4)]), r'invalid unit \(0, 4\)'),
    (dict(units=[(2, 1)]), r'invalid unit \(2, 1\)'),
    (dict(units=[(0, 1), (0, 1)]), 'repeat a unit'),
    (dict(units=[]), 'units is empty'),
])
def test_bad_construction_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _learner(**{'mode': 'loco', **kwargs})


def test_backbone_without_known_stages_is_a_value_error():
    class Tiny(torch.nn.Module):
        def forward_features(self, x):
            return x
    with pytest.raises(ValueError, match='cannot split Tiny'):
        LocalLearner(Tiny())


@pytest.mark.parametrize('views,match', [
    ((torch.randn(4, 3, 32, 32, dtype=DTYPE), torch.randn(4, 3, 28, 28, dtype=DTYPE)), 'same shape'),
    ((torch.randn(1, 3, 32, 32, dtype=DTYPE), torch.randn(1, 3, 32, 32, dtype=DTYPE)), 'batch of 1 image'),
])
def test_bad_views_are_a_value_error(views, match):
    with pytest.raises(ValueError, match=match):
        _learner('loco').step(*views)


def test_unknown_unit_index_is_a_value_error():
    with pytest.raises(ValueError, match=r'units=\[3\] must be indices'):
        _learner('loco').step(*views(), units=[3])


@pytest.mark.parametrize('mode,kwargs', [('loco', {}), ('loco', dict(top_unit=True)), ('gim', {}), ('e2e', {}),
                                         ('loco', dict(units=[(0, 2), (1, 3)]))])
def test_recompute_gives_the_same_gradients_weights_and_batchnorm_statistics(mode, kwargs):
    results = []
    for recompute in (False, True):
        learner = _learner(mode, recompute=recompute, **kwargs)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.5)
        first = None
        for seed in (1, 2):  # two steps: the second starts from updated weights and statistics
            optimizer.zero_grad()
            learner.step(*views(seed=seed))
            first = first or grads(list(learner.parameters()))
            optimizer.step()
        results.append((first, [p.detach().clone() for p in learner.parameters()],
                        [b.clone() for b in learner.buffers()]))
    (first, params, buffers), (first_r, params_r, buffers_r) = results
    assert_close(first_r, first)
    assert_close(params_r, params)
    for a, e in zip(buffers_r, buffers, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    assert any(b.dtype == torch.int64 and b.item() == 2 for b in buffers_r)  # num_batches_tracked: once per step


def test_recompute_runs_a_stage_forward_again_only_while_a_higher_unit_needs_it():
    # the top stage's only unit has its loss right away
    assert _forwards_per_stage(_learner('loco', recompute=True)) == [2, 2, 2, 1]
