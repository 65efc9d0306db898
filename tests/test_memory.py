"""The step's schedule keeps only what the next unit needs: peak saved-activation bytes (deterministic on CPU)
stay within the largest unit plus its decoder, and every stage is forwarded once."""
import pytest
import timm
import torch

from loco_timm import LocalLearner
from loco_timm.core.stages import detach_stage_output, stage_feature, stage_tensors
from tools.memory import SavedTensorMeter, saved_bytes

TOLERANCE = 1.02  # the loss's own small saved tensors and bookkeeping


# an adapter family, then families split by the generic splitter: NHWC maps (MambaOut), a hybrid conv/attention
# model (MaxViT), a densely connected CNN (DenseNet, whose input to each dense layer is a concatenation)
MODELS = ['test_resnet', 'test_mambaout', 'test_maxvit', 'densenet121']
MODEL_ARGS = {'test_maxvit': dict(img_size=64)}  # its attention windows follow the image size


def _learner(mode, name='test_resnet', **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **MODEL_ARGS.get(name, {}))
    return LocalLearner(model, mode=mode, input_size=(3, 64, 64), **kwargs)


def _nbytes(output):
    return sum(t.numel() * t.element_size() for t in stage_tensors(output))


def _views(batch=8, size=64):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, 3, size, size, generator=g) for _ in range(2))


def _stage_and_decoder_bytes(learner, views):
    """Saved bytes of each stage run alone (on a detached input, as in step) and of each unit's decoder + loss."""
    params = list(learner.parameters())
    h = torch.cat(views)
    stage, outputs = [], []
    for s in learner.stages:
        x = detach_stage_output(h, True)
        stage.append(saved_bytes(lambda x, s=s: stage_tensors(s(x)), x, exclude=params))
        with torch.no_grad():
            h = s(h)
        outputs.append(h)
    batch = len(views[0])

    def decode(j, feature):
        z = learner.decoders[j](feature)
        return learner.loss(z[:batch], z[batch:])
    decoder = [saved_bytes(decode, j, detach_stage_output(stage_feature(outputs[last]), True), exclude=params)
               for j, (_, last) in enumerate(learner.units)]
    return stage, decoder


def _peak(learner, views):
    with SavedTensorMeter(exclude=list(learner.parameters())) as meter:
        learner.step(*views)
    assert meter.current == 0, 'the step left saved activations alive'
    return meter.peak


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('mode,kwargs', [('loco', {}), ('loco', dict(top_unit=True)), ('gim', {}), ('e2e', {}),
                                         ('loco', dict(units=[(0, 2), (1, 3)]))])
def test_peak_activation_memory_is_the_largest_unit_plus_its_decoder(mode, kwargs, name):
    learner = _learner(mode, name, **kwargs)
    views = _views()
    stage, decoder = _stage_and_decoder_bytes(learner, views)
    largest = max(sum(stage[first:last + 1]) + decoder[j] for j, (first, last) in enumerate(learner.units))
    peak = _peak(learner, views)
    assert peak <= largest * TOLERANCE, (peak, largest, stage, decoder)


def test_end_to_end_keeps_what_plain_backprop_keeps():
    learner = _learner('e2e')
    views = _views()

    def plain(x):
        z = learner.decoders[0](learner.encoder.forward_features(x))
        return learner.loss(z[:len(views[0])], z[len(views[0]):])
    reference = saved_bytes(plain, torch.cat(views), exclude=list(learner.parameters()))
    assert abs(_peak(learner, views) - reference) <= 0.02 * reference


@pytest.mark.parametrize('name', MODELS)
def test_local_schedules_keep_less_than_end_to_end(name):
    views = _views()
    e2e, gim, loco = (_peak(_learner(mode, name, decoder='mlp'), views) for mode in ('e2e', 'gim', 'loco'))
    assert gim < loco < e2e


def test_meter_counts_each_storage_once_and_no_parameters():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)
    with SavedTensorMeter(exclude=lin.parameters()) as meter:
        y = lin(x)  # saves x (and the weight, excluded)
        z = (y * y).sum()  # saves y once, though y is both operands
        assert meter.current == x.numel() * 4 + y.numel() * 4
        z.backward()
    assert meter.current == 0 and meter.peak == 2 * 4 * 16 * 4


@pytest.mark.parametrize('name', MODELS)
def test_recompute_keeps_about_one_stage_for_loco(name):
    views = _views()
    learner = _learner('loco', name, recompute=True)
    stage, decoder = _stage_and_decoder_bytes(learner, views)
    plain = _peak(_learner('loco', name), views)
    recomputed = _peak(learner, views)
    # at any time: one stage's graph (its forward or recompute) with the next stage's input, or a unit's top stage
    # and decoder with the kept input of the unit's lower stage
    inputs, h = [], torch.cat(views)
    with torch.no_grad():
        for s in learner.stages:
            inputs.append(_nbytes(h))
            h = s(h)
    inputs.append(_nbytes(h))
    bound = max(max(stage[k] + inputs[k + 1] for k in range(len(stage))),
                max(stage[last] + decoder[j] + inputs[first] for j, (first, last) in enumerate(learner.units)))
    assert recomputed <= bound * TOLERANCE, (recomputed, bound)
    assert recomputed < plain
