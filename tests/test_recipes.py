"""The ImageNet recipes are the paper's, literally; and they run (dry run with size overrides only)."""
import json

import pytest
from formats import hf_parquet, wds_shards
from PIL import Image
from zoo_common import cli_here

from loco_timm.config import ReadoutConfig, TrainConfig, from_dict, load_recipe
from loco_timm.models.tags import get_hub_config

# arXiv:2008.01342 (../shared/PAPER.md): batch 4096, LARS lr 4.8 (= 0.3 x 4096/256), cosine, 10 warm-up epochs,
# 800 epochs, 224 px, SimCLR augmentations; where the paper is silent, SimCLR's defaults: temperature 0.1, weight
# decay 1e-6, crop scale (0.08, 1), 128-d projection. Linear readout: SGD without momentum, lr 30, 100 epochs,
# lr /10 at epochs 30, 60, 90, on the raw (not standardised) pooled features.
PAPER_TRAIN = dict(batch_size=4096, optimizer='lars', lr=4.8, warmup_epochs=10, epochs=800, image_size=224,
                   temperature=0.1, weight_decay=1e-6, crop_scale=[0.08, 1.0], proj_dim=128, momentum=0.9,
                   grad_accumulation=1, backbone='loco_resnet50', model_args={}, dataset='imagefolder')
PAPER_READOUT = dict(lr=30.0, momentum=0.0, epochs=100, milestone_epochs=[30, 60, 90], weight_decay=0.0,
                     lr_grid=None, standardize=False)
ARMS = {'loco_resnet50.simclr_in1k': ('loco', 'conv'), 'loco_resnet50.e2e_simclr_in1k': ('e2e', 'mlp'),
        'loco_resnet50.gim_simclr_in1k': ('gim', 'conv')}
# the paper's other encoders: the same recipe; the progressive ResNet-50 at the ablations' 100 epochs
OTHER_ENCODERS = {f'{arch}.{tag}': (arch, epochs, mode_decoder)
                  for arch, epochs in (('loco_shufflenet_v2_50', 800), ('loco_presnet50', 100))
                  for tag, mode_decoder in (('simclr_in1k', ('loco', 'conv')), ('e2e_simclr_in1k', ('e2e', 'mlp')),
                                            ('gim_simclr_in1k', ('gim', 'conv')))}
# the paper's linear top-1 (Table 1; supplementary for the progressive ResNet-50)
PAPER_TOP1 = {'loco_resnet50': dict(loco=69.5, e2e=69.8, gim=64.7),
              'loco_shufflenet_v2_50': dict(loco=69.3, e2e=69.1, gim=63.5),
              'loco_presnet50': dict(loco=66.6, e2e=66.8, gim=52.6)}


def _values(train: TrainConfig, readout: ReadoutConfig) -> tuple[dict, dict]:
    t = {k: getattr(train, k) for k in PAPER_TRAIN if k != 'lr'}
    t['lr'] = train.lr
    r = {k: getattr(readout, k) for k in PAPER_READOUT if k != 'milestone_epochs'}
    r['milestone_epochs'] = [round(m * readout.epochs) for m in readout.milestones]
    return t, r


def _assert_equal(values: dict, expected: dict, skip=()) -> None:
    for key, value in expected.items():
        if key in skip:
            continue
        if isinstance(value, float):
            assert values[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert values[key] == value, key


@pytest.mark.parametrize('tag', ARMS)
def test_imagenet_recipe_is_the_papers(tag):
    recipe = load_recipe(tag)
    train, readout = from_dict(TrainConfig, recipe['train']), from_dict(ReadoutConfig, recipe['readout'])
    t, r = _values(train, readout)
    assert t.keys() == PAPER_TRAIN.keys() and r.keys() == PAPER_READOUT.keys()
    _assert_equal(t, PAPER_TRAIN)
    _assert_equal(r, PAPER_READOUT)
    assert (train.mode, train.decoder) == ARMS[tag] and not train.top_unit and train.units is None
    assert get_hub_config(tag).model['timm_architecture'] == 'resnet50'
    assert get_hub_config(tag).metrics['linear_top1'] == PAPER_TOP1['loco_resnet50'][train.mode]


@pytest.mark.parametrize('tag', OTHER_ENCODERS)
def test_other_encoders_recipes_are_the_papers(tag):
    arch, epochs, mode_decoder = OTHER_ENCODERS[tag]
    recipe = load_recipe(tag)
    train, readout = from_dict(TrainConfig, recipe['train']), from_dict(ReadoutConfig, recipe['readout'])
    t, r = _values(train, readout)
    _assert_equal(t, dict(PAPER_TRAIN, backbone=arch, epochs=epochs))
    _assert_equal(r, PAPER_READOUT)
    assert (train.mode, train.decoder) == mode_decoder and not train.top_unit and train.units is None
    hub = get_hub_config(tag)
    assert 'timm_architecture' not in hub.model  # plain timm has no such model: exports need `import loco_timm`
    assert hub.metrics['linear_top1'] == PAPER_TOP1[arch][train.mode]


def _image_folder(root):
    for split in ('train', 'val'):
        for c, color in enumerate(((200, 30, 30), (30, 30, 200))):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new('RGB', (40, 36), tuple(v + 10 * i for v in color)).save(folder / f'{i}.png')
    return root


def _source(kind, root):
    """The dataset flags of a folder, a Hugging Face dataset (parquet) or WebDataset shards."""
    if kind == 'folder':
        return ['--data-dir', _image_folder(root)]
    if kind == 'hfds':
        return ['--dataset', f'hfds/{hf_parquet(root)}', '--data-dir', root / 'cache']
    return ['--dataset', 'wds/tiny', '--data-dir', wds_shards(root), '--splits', '{test: validation}']


@pytest.mark.slow
@pytest.mark.parametrize('source', ['folder', 'hfds', 'wds'])
def test_imagenet_recipe_dry_runs_with_only_size_overrides(tmp_path, source):
    if source != 'folder':
        pytest.importorskip('datasets' if source == 'hfds' else 'webdataset')
    data, run = _source(source, tmp_path / 'data'), tmp_path / 'run'
    overrides = [*data, '--out-dir', run, '--batch-size', '4', '--image-size', '32', '--max-steps', '2',
                 '--trackers', 'none']
    tag = 'loco_resnet50.simclr_in1k'
    cli_here('train', '--config', tag, *overrides)  # `loco-timm train`, in the test process
    progress = json.loads(next(run.glob('checkpoints/step-*/progress.json')).read_text())
    trained = from_dict(TrainConfig, progress['config'])
    assert progress['step'] == 2 and (trained.batch_size, trained.image_size) == (4, 32)
    t, _ = _values(trained, ReadoutConfig())
    _assert_equal(t, PAPER_TRAIN, skip=('batch_size', 'image_size', 'lr', 'dataset'))  # all else is the paper's
    assert trained.base_lr * 4096 / 256 == pytest.approx(4.8)
    assert (trained.mixed_precision, trained.sync_bn) == ('bf16', True)
    only_model = ['--references', 'false'] if source != 'folder' else []  # the reference rows: once is enough
    cli_here('readout', run, '--config', tag, '--epochs', '3', '--knn-k', '4', *only_model)
    results = json.loads((run / 'readout.json').read_text())
    assert len(results['rows']['model']['linear']) == 4  # every stage read out
    used = results['readout']
    assert (used['lr'], used['momentum'], used['milestones'], used['standardize']) == (30.0, 0.0, [0.3, 0.6, 0.9],
                                                                                       False)
