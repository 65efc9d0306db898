"""The paper's ablation switches: decoder depth and the sharing strategies between overlapping LoCo units, each
checked against a hand-written autograd reference (float64) on a tiny ResNet."""
import pytest
import torch
from reference import assert_close, grads, ref_nt_xent, ref_unit_loss, resnet_stage_fns, resnet_stage_params, views
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from loco_timm import LocalLearner
from loco_timm.config import TrainConfig
from loco_timm.training.factory import build_learner

T = 0.1
DTYPE = torch.float64


def _resnet():
    """A ResNet with 2 blocks in the stages after the first (the "blocks" switch cuts inside them)."""
    return ResNet(BasicBlock, layers=(1, 2, 2, 2), channels=(8, 8, 16, 16), num_classes=0, zero_init_last=False)


def _learner(**kwargs):
    torch.manual_seed(0)
    return LocalLearner(_resnet(), 'loco', input_size=(3, 32, 32), temperature=T, **kwargs).to(DTYPE)



def _reference(learner, params, losses_and_params):
    """Sum over units of d loss / d (the parameters the unit may train), zero elsewhere."""
    total = [torch.zeros_like(p) for p in params]
    index = {id(p): i for i, p in enumerate(params)}
    for loss, trained in losses_and_params:
        for p, g in zip(trained, torch.autograd.grad(loss, trained, allow_unused=True)):
            if g is not None:
                total[index[id(p)]] += g
    return total


def test_decoder_depth_switches_build_the_papers_decoders():
    learner = _learner(decoder_blocks=2, mlp_layers=4)
    dec = learner.decoders[0]
    assert [b.conv2.stride for b in dec.block] == [(2, 2), (1, 1)]  # one downsampling block, then one plain
    assert sum(isinstance(m, nn.Linear) for m in dec.mlp.modules()) == 4
    plain = _learner(decoder_blocks=0).decoders[0]
    assert isinstance(plain.block, nn.Identity) and sum(isinstance(m, nn.Linear) for m in plain.mlp.modules()) == 2
    assert set(_learner().decoders[0].mlp.state_dict()) == {  # the default head keeps its checkpoint keys
        'fc1.weight', 'norm.weight', 'norm.bias', 'norm.running_mean', 'norm.running_var', 'norm.num_batches_tracked',
        'fc2.weight', 'fc2.bias'}
    view1, view2 = views()
    losses = learner.step(view1, view2)
    assert all(torch.isfinite(v) for v in losses.values())


def test_no_sharing_is_gim_with_the_same_decoders():
    view1, view2 = views()
    none = _learner(sharing='none')
    torch.manual_seed(0)
    gim = LocalLearner(_resnet(), 'gim', input_size=(3, 32, 32), temperature=T).to(DTYPE)
    assert none.units == gim.units
    gim.load_state_dict(none.state_dict())
    none.step(view1, view2)
    gim.step(view1, view2)
    assert_close(grads(list(none.parameters())), grads(list(gim.parameters())))


def test_upper_layer_gradient_only():
    """A shared stage's weights take only the unit above's gradient; the lower unit's loss still reaches the stage
    below it through the shared stage."""
    learner = _learner(sharing='upper')
    view1, view2 = views()
    model = learner.encoder
    fns, stage_params = resnet_stage_fns(model), resnet_stage_params(model)
    starts = {first for first, _ in learner.units}
    terms = []
    for j, (first, last) in enumerate(learner.units):
        trained = list(stage_params[first]) + list(learner.decoders[j].parameters())
        if last not in starts:  # the top stage of the last unit is in no other unit: it learns from this one
            trained += stage_params[last]
        terms.append((ref_unit_loss(learner, j, fns, view1, view2, T), trained))
    params = [p for ps in stage_params for p in ps] + list(learner.decoders.parameters())
    expected = _reference(learner, params, terms)
    learner.step(view1, view2)
    assert_close(grads(params), expected)
    full = _learner()
    full.step(view1, view2)
    ours, theirs = grads(stage_params[1]), grads(resnet_stage_params(full.encoder)[1])
    assert all(g.abs().sum() > 0 for g in ours)
    assert not all(torch.allclose(a, b) for a, b in zip(ours, theirs))  # full sharing adds the lower unit's part


@pytest.mark.parametrize('blocks', [1])
def test_sharing_the_first_blocks_of_the_next_stage(blocks):
    learner = _learner(sharing='blocks', sharing_blocks=blocks)
    model = learner.encoder
    assert learner.units == [(0, 1), (1, 3), (3, 5), (5, 6)] and len(learner.stages) == 7
    stem_res2 = resnet_stage_fns(model)[0]
    fns = [stem_res2]
    for layer in (model.layer2, model.layer3, model.layer4):
        fns += [layer[:blocks], layer[blocks:]]
    view1, view2 = views()
    params = list(learner.parameters())
    terms = [(ref_unit_loss(learner, j, fns, view1, view2, T), params) for j in range(len(learner.units))]
    expected = _reference(learner, params, terms)
    learner.step(view1, view2)
    assert_close(grads(params), expected)
    with torch.no_grad():  # the decoders of the lower units read the first block's output
        h = fns[0](torch.cat([view1, view2]))
        assert learner.stage_shapes[1] == tuple(model.layer2[:blocks](h).shape[1:])


def test_l2_soft_sharing_gives_each_unit_its_own_copy_and_a_penalty():
    coef = 1e-2
    learner = _learner(sharing='l2', sharing_l2=coef)
    soft = learner.sharing_copies
    assert sorted(soft.copies) == [1, 2]  # stages 1 and 2 are in two units; stage 3 only in the top one
    for (a_name, a), (b_name, b) in zip(learner.stages[1].named_parameters(), soft.copies[1].named_parameters()):
        assert a_name == b_name and a is not b and torch.equal(a, b)  # identical at initialisation, not shared
    with torch.no_grad():  # let copies and originals differ, as after some training
        for _, b in soft.encoder_copy.named_parameters():
            b.add_(0.01 * torch.randn_like(b))
    view1, view2 = views()
    model, copy_model = learner.encoder, soft.encoder_copy
    fns, copy_fns = resnet_stage_fns(model), resnet_stage_fns(copy_model)
    stage_params, copy_params = resnet_stage_params(model), resnet_stage_params(copy_model)
    terms = []
    for j, (first, last) in enumerate(learner.units):
        h = torch.cat([view1, view2])
        with torch.no_grad():
            for fn in fns[:first]:
                h = fn(h)
        h = fns[first](h.detach())
        upper = copy_fns[last] if last in soft.copies else fns[last]
        z = learner.decoders[j](upper(h))
        trained = list(stage_params[first]) + list(learner.decoders[j].parameters()) + (
            list(copy_params[last]) if last in soft.copies else list(stage_params[last]))
        terms.append((ref_nt_xent(z[:4], z[4:], T), trained))
    penalty = coef * sum(((a - b) ** 2).sum() for m in (1, 2) for a, b in zip(stage_params[m], copy_params[m]))
    params = list(learner.parameters())
    terms.append((penalty, [p for m in (1, 2) for p in stage_params[m] + copy_params[m]]))
    expected = _reference(learner, params, terms)
    learner.step(view1, view2)
    assert_close(grads(params), expected)
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    learner.eval()
    with torch.no_grad():  # the encoder (readout, export) is the originals
        torch.testing.assert_close(learner(x)[-1], model.forward_features(x))


@pytest.mark.parametrize('kwargs, message', [
    (dict(mode='gim', sharing='upper'), 'use it with mode="loco"'),
    (dict(sharing='l2', recompute=True), 'recompute does not apply'),
    (dict(sharing='shared'), 'unknown sharing'),
    (dict(sharing='blocks', sharing_blocks=2), 'after its first 2 block'),
    (dict(decoder_blocks=-1), 'decoder_blocks=-1'),
    (dict(mlp_layers=1), 'mlp_layers=1'),
])
def test_bad_switches_are_one_line_value_errors(kwargs, message):
    kwargs = dict(dict(mode='loco'), **kwargs)
    with pytest.raises(ValueError, match=message) as err:
        LocalLearner(_resnet(), input_size=(3, 32, 32), **kwargs)
    assert '\n' not in str(err.value)


def test_switches_are_recipe_keys():
    cfg = TrainConfig(backbone='test_resnet', image_size=32, sharing='l2', sharing_l2=1e-4, decoder_blocks=2,
                      mlp_layers=4)
    learner = build_learner(cfg, in_chans=3, num_classes=0)
    assert learner.config['sharing'] == 'l2' and learner.sharing_copies.coef == 1e-4
    assert learner.config['decoder_blocks'] == 2 and learner.config['mlp_layers'] == 4


def test_upper_sharing_keeps_its_owners_when_only_some_units_run():
    """Stage 1 belongs to unit 1 under "upper": unit 0 alone passes its gradient through it but does not train it."""
    learner = _learner(sharing='upper')
    learner.step(*views(), units=[0])
    stage_params = resnet_stage_params(learner.encoder)
    assert all(p.grad is None or not p.grad.any() for p in stage_params[1])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage_params[0])


def test_the_l2_penalty_goes_through_the_trainers_backward_like_the_losses():
    """A loss scaler (fp16) scales every loss it is given; the penalty must be one of them, or unscaling would
    shrink it by the scale factor."""
    def run(backward):
        learner = _learner(sharing='l2', sharing_l2=1e-2)
        with torch.no_grad():
            for _, b in learner.sharing_copies.encoder_copy.named_parameters():
                b.add_(0.01 * torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel()), dtype=DTYPE))
        learner.step(*views(), backward=backward)
        return grads(list(learner.parameters()))
    plain = run(None)
    doubled = run(lambda loss: (2 * loss).backward())
    assert_close(doubled, [2 * g for g in plain])
