"""Every format timm reads (folder, tar, Hugging Face datasets random-access and streamed, WebDataset shards,
torchvision's folder and Fashion-MNIST) gives the same images and labels, crops them from the whole image, and fails
with one line naming the fix."""
from __future__ import annotations

import builtins
import io

import pytest
import torch
from formats import CLASSES, SPLITS, hf_parquet, image_folder, tar_splits, wds_shards
from PIL import Image

from loco_timm.config import ConfigError, TrainConfig
from loco_timm.data.crops import ViewCropSpec, needed_size, view_crops
from loco_timm.data.datasets import build_dataset
from loco_timm.data.sources import decode

pytest.importorskip('datasets')
pytest.importorskip('webdataset')


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp('formats')
    hf = hf_parquet(root / 'hf')
    return {'folder': ('imagefolder', image_folder(root / 'folder')),
            'tar': ('imagefolder', tar_splits(root / 'tar')),
            'hfds': (f'hfds/{hf}', root / 'hf-cache'),
            'hfids': (f'hfids/{hf}', root / 'hf-cache'),
            'wds': ('wds/tiny', wds_shards(root / 'wds')),
            'torch': ('torch/image_folder', root / 'folder')}


def _items(ds):
    return list(ds) if isinstance(ds, torch.utils.data.IterableDataset) else [ds[i] for i in range(len(ds))]


def _contents(ds):
    """The multiset of (label, image bytes) of a dataset's items: independent of the order a format reads in."""
    return sorted((int(label), image.numpy().tobytes()) for image, label, _ in _items(ds))


@pytest.mark.parametrize('split', ['train', 'test'])
def test_every_format_gives_the_same_images_and_labels(sources, split):
    name, data_dir = sources['folder']
    folder = _contents(build_dataset(name, split, data_dir, image_size=24, draft=False))
    assert len(folder) == SPLITS['train' if split == 'train' else 'validation']
    assert sorted({label for label, _ in folder}) == [0, 1, 2]
    for fmt, (name, data_dir) in sources.items():
        ds = build_dataset(name, split, data_dir, image_size=24, draft=False)
        names = (list(CLASSES), ['0', '1', '2']) + (([],) if fmt == 'hfids' else ())  # older timm: no names
        assert ds.classes in names, fmt
        assert _contents(ds) == folder, fmt


def test_pretraining_items_are_both_views_cut_from_the_whole_image(sources):
    spec = ViewCropSpec(24, scale=(0.08, 1.0), seed=3)
    for fmt, (name, data_dir) in sources.items():
        ds = build_dataset(name, 'pretrain', data_dir, image_size=24, crops=spec, seed=3)
        items = _items(ds)
        assert len(items) == SPLITS['train'], fmt
        views, label, index = items[0]
        assert views.shape == (2, 3, 24, 24) and views.dtype == torch.uint8, fmt
        assert sorted(int(i) for _, _, i in items) == list(range(SPLITS['train'])), fmt  # keys of the crop draws


def _jpeg(width: int, height: int) -> bytes:
    ramp = torch.linspace(0, 255, width).repeat(height, 1)
    pixels = torch.stack([ramp, ramp.flip(1), torch.full_like(ramp, 90)], -1).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def test_draft_decoding_scales_down_only_as_far_as_the_smallest_crop_allows():
    data, spec = _jpeg(800, 600), ViewCropSpec(64, scale=(0.5, 1.0), seed=0)
    full = decode(data, draft=False)
    for index in range(8):
        need = needed_size(600, 800, index, 0, spec)
        small = decode(data, lambda w, h, index=index: needed_size(h, w, index, 0, spec))
        assert small.shape[2] >= need[0] and small.shape[1] >= need[1]  # no crop is upsampled
        assert small.shape[2] < 800  # crops of >= half the area of an 800x600 image need at most 1/2 of it
        a, b = view_crops(full, index, 0, spec).float(), view_crops(small, index, 0, spec).float()
        assert (a - b).abs().mean() < 4  # the same crops (up to rounding of the box and the decoder's scaling)
    assert decode(_jpeg(100, 80), (64, 64)).shape == (3, 80, 100)  # never below the request


def test_streams_shuffle_by_seed_and_epoch_and_repeat_exactly(sources):
    name, data_dir = sources['wds']
    spec = ViewCropSpec(24, seed=0)

    def order(epoch, seed=0):
        ds = build_dataset(name, 'pretrain', data_dir, 24, crops=spec, seed=seed)
        ds.set_epoch(epoch)
        return [(int(label), views.sum().item()) for views, label, _ in ds]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) != sorted(order(2))  # other crop draws too, not only another order


def test_a_stream_trains_and_resumes_mid_epoch_to_the_same_weights(sources, tmp_path):
    from safetensors.torch import load_file

    from loco_timm.training.train import train
    name, data_dir = sources['wds']
    common = dict(backbone='test_resnet', dataset=name, data_dir=str(data_dir), image_size=24, batch_size=6,
                  max_steps=5, epochs=2, checkpoint_every=2, trackers='none', base_lr=0.1, decoder='mlp')
    train(TrainConfig(**common, out_dir=str(tmp_path / 'whole')))

    def crash(step, learner):
        if step == 4:  # in epoch 1 (3 steps of 6 of the 18 images per epoch), after the checkpoint of step 4
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**common, out_dir=str(tmp_path / 'cut')), after_backward=crash)
    train(TrainConfig(**common, out_dir=str(tmp_path / 'cut')), resume=True)
    whole, cut = (load_file(str(tmp_path / run / 'checkpoints/step-00000005/learner.safetensors'))
                  for run in ('whole', 'cut'))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_bad_sources_fail_with_one_line_naming_the_fix(sources, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"dataset='imagenet' is not valid: .* or a timm dataset name"):
        TrainConfig(dataset='imagenet')
    with pytest.raises(ConfigError, match=r"splits=\{'val': 'x'\} is not valid"):
        TrainConfig(dataset='imagefolder', splits={'val': 'x'})
    name, data_dir = sources['wds']
    with pytest.raises(FileNotFoundError, match=r"split 'nope' could not be read in .*check the name, data_dir and"):
        build_dataset(name, 'test', data_dir, 24, splits={'test': 'nope'})
    with pytest.raises(FileNotFoundError, match='is not a folder: wds/tiny needs data_dir holding the shards'):
        build_dataset(name, 'test', tmp_path / 'missing', 24)
    with pytest.raises(FileNotFoundError, match='imagefolder needs data_dir holding'):
        build_dataset('imagefolder', 'test', tmp_path / 'missing', 24)
    real_import = builtins.__import__

    def no_datasets(module, *args, **kwargs):
        if module == 'datasets':
            raise ImportError(module)
        return real_import(module, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_datasets)
    with pytest.raises(ImportError, match=r"needs the package datasets: pip install datasets"):
        build_dataset('hfds/x', 'test', tmp_path, 24)


def test_torchvision_fashion_mnist_through_timm_matches_the_embedded_default():
    from torchvision.transforms import v2

    from loco_timm.data.datasets import cache_dir
    ours = build_dataset('fashion_mnist', 'test', image_size=28, subset=16)  # unpacks torchvision's layout
    through_timm = build_dataset('torch/fashion_mnist', 'test', cache_dir() / 'data', image_size=28, subset=16)
    assert len(through_timm) == 16 and through_timm.classes == ours.classes
    for i in range(16):
        image, label, _ = through_timm[i]
        gray, expected, _ = ours[i]
        assert label == int(expected)
        assert torch.equal(image, v2.functional.resize(gray.expand(3, -1, -1), 32, antialias=True))  # 8/7 of 28


def test_a_streams_epoch_is_the_same_with_loader_workers_and_keys_items_uniquely(sources):
    from loco_timm.data.sources import StreamLoader
    name, data_dir = sources['wds']
    ds = build_dataset(name, 'pretrain', data_dir, 24, crops=ViewCropSpec(24, seed=0), batch_size=3)
    loader = StreamLoader(ds, 3, num_workers=2, pin=False, seed=0, rank=0, device=torch.device('cpu'))

    def epoch(e, skip=0):
        return [(views.sum((1, 2, 3, 4)).tolist(), index.tolist()) for views, _, index in loader.epoch(e, skip, 6)]
    first = epoch(1)
    assert len(first) == 6 and epoch(1) == first and epoch(1, skip=4) == first[4:]
    assert sorted(i for _, index in first for i in index) == list(range(18))  # position x workers + worker
    assert epoch(2) != first


def test_decoding_on_the_device_gives_the_loaders_crops_and_the_same_training(sources, tmp_path):
    from safetensors.torch import load_file

    from loco_timm.data.sources import collate_encoded, decode_views
    from loco_timm.training.train import train
    name, data_dir = sources['folder']
    spec = ViewCropSpec(24, seed=2)
    png = tmp_path / 'mixed' / 'train' / 'cat'
    png.mkdir(parents=True)
    Image.new('RGB', (50, 30), (200, 40, 40)).save(png / 'a.png')
    (png / 'b.jpg').write_bytes(_jpeg(64, 40))
    for folder in (data_dir, tmp_path / 'mixed'):
        cpu = build_dataset('imagefolder', 'pretrain', folder, 24, crops=spec, draft=False)
        encoded = build_dataset('imagefolder', 'pretrain', folder, 24, crops=spec, encoded=True)
        keys = [3 * (1 << 40) + i for i in range(len(cpu))]  # epoch 3
        (payloads, boxes), labels, index = collate_encoded([encoded[k] for k in keys])
        views = decode_views(payloads, boxes, 24, 'cpu')
        assert views.shape == (len(cpu), 2, 3, 24, 24) and views.dtype == torch.uint8
        assert torch.equal(views, torch.stack([cpu[k][0] for k in keys]))
        assert labels.tolist() == [cpu[k][1] for k in keys] and index.tolist() == list(range(len(cpu)))
    common = dict(backbone='test_resnet', dataset=name, data_dir=str(data_dir), image_size=24, batch_size=6,
                  max_steps=2, trackers='none', decoder='mlp', decode_draft=False)
    train(TrainConfig(**common, out_dir=str(tmp_path / 'cpu')))
    train(TrainConfig(**common, decode_device=True, out_dir=str(tmp_path / 'device')))
    a, b = (load_file(str(tmp_path / run / 'checkpoints/step-00000002/learner.safetensors'))
            for run in ('cpu', 'device'))
    assert all(torch.equal(a[k], b[k]) for k in a)
