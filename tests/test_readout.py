"""Readout building blocks: the linear probe, its learning-rate selection on held-out training data, and kNN."""
import pytest
import torch

from loco_timm.config import ConfigError, ReadoutConfig
from loco_timm.evaluation.readout import evaluate_features, knn_accuracy, select_lr, train_linear


def _blobs(n=600, dim=8, classes=3, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * scale
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=g) + 10.0, y  # offset: standardisation must handle it


def test_linear_head_takes_raw_features_with_the_standardisation_folded_in():
    x, y = _blobs()
    cfg = ReadoutConfig(epochs=20, lr=0.1, batch_size=64)
    head = train_linear(x, y, 3, cfg)
    assert (head(x).argmax(1) == y).float().mean() > 0.99
    # standardising first makes the probe blind to per-feature scale and offset of the raw features
    scale, shift = torch.linspace(0.1, 50, x.shape[1]), torch.linspace(-100, 100, x.shape[1])
    rescaled = train_linear(x * scale + shift, y, 3, cfg)
    with torch.no_grad():
        torch.testing.assert_close(rescaled(x * scale + shift), head(x), rtol=1e-3, atol=1e-3)


def test_unstandardised_probe_is_plain_sgd_on_the_raw_features():
    # the paper's readout (lr 30, no momentum) on raw features: one full-batch epoch is one SGD step from the seeded
    # initialisation, W' = W - lr * (softmax(XW^T + b) - onehot)^T X / N, in closed form
    x, y = _blobs(n=30)
    cfg = ReadoutConfig(epochs=1, lr=30.0, momentum=0.0, batch_size=30, standardize=False, milestones=[0.9])
    head = train_linear(x, y, 3, cfg)
    init = train_linear(x, y, 3, ReadoutConfig(epochs=1, lr=1e-30, momentum=0.0, batch_size=30,
                                               standardize=False))  # same seeded start, no step
    with torch.no_grad():
        residual = (torch.softmax(init(x), 1) - torch.nn.functional.one_hot(y, 3).float()) / len(x)
        torch.testing.assert_close(head.weight, init.weight - 30.0 * residual.T @ x, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(head.bias, init.bias - 30.0 * residual.sum(0), rtol=1e-4, atol=1e-4)
    standardised = train_linear(x, y, 3, ReadoutConfig(epochs=1, lr=30.0, momentum=0.0, batch_size=30,
                                                       milestones=[0.9]))
    assert not torch.allclose(standardised.weight, head.weight)


def test_lr_is_selected_on_held_out_training_data_whatever_the_grid_order():
    x, y = _blobs()
    cfg = ReadoutConfig(epochs=5, batch_size=64, lr=0.1)
    assert select_lr(x, y, 3, cfg) == 0.1  # no grid: the recipe's lr
    for grid in ([1e-7, 0.3], [0.3, 1e-7]):
        assert select_lr(x, y, 3, ReadoutConfig(epochs=5, batch_size=64, lr_grid=grid)) == 0.3


def test_evaluate_features_reports_the_lr_used_per_stage():
    (x, y), (tx, ty) = _blobs(seed=0), _blobs(n=90, seed=0)
    cfg = ReadoutConfig(epochs=5, batch_size=64, lr_grid=[1e-7, 0.3], knn_k=10)
    rows, head = evaluate_features(([x, x[:, :2]], y), ([tx, tx[:, :2]], ty), 3, cfg)
    assert rows['lr'] == [0.3, 0.3] and len(rows['linear']) == len(rows['knn']) == 2
    assert rows['linear'][0] > 95 and head.in_features == 2


def test_knn_votes_with_cosine_similarity_and_temperature_weights():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.2]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    # k=1: nearest neighbours are bank[0] (label 0) and bank[1] (label 1)
    assert knn_accuracy(bank, labels, query, torch.tensor([0, 1]), 2, k=1) == 1.0
    # k=3, T=1: query 0 sums exp(cos) over label 1 (two close-ish points) above label 0 (one point)
    assert knn_accuracy(bank, labels, query[:1], torch.tensor([1]), 2, k=3, temperature=1.0) == 1.0
    # a low temperature makes the single most similar point win
    assert knn_accuracy(bank, labels, query[:1], torch.tensor([0]), 2, k=3, temperature=0.05) == 1.0


@pytest.mark.parametrize('grid', [[], [0.1, -1.0], ['a'], [True]])
def test_bad_lr_grid_is_refused(grid):
    with pytest.raises(ConfigError, match='lr_grid'):
        ReadoutConfig(lr_grid=grid)


def _checkpoint(folder, **overrides):
    """A checkpoint folder as `loco-timm train` writes it, of a learner that was never trained (seeded init)."""
    import json

    from safetensors.torch import save_file

    from loco_timm.config import TrainConfig
    from loco_timm.config import to_json as _as_json
    from loco_timm.training.factory import build_learner
    cfg = TrainConfig(**dict(dict(backbone='test_resnet', dataset='fashion_mnist', image_size=28, seed=0), **overrides))
    torch.manual_seed(cfg.seed)
    learner = build_learner(cfg, 1, 10)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in learner.state_dict().items()}, str(folder / 'learner.safetensors'))
    (folder / 'progress.json').write_text(json.dumps(dict(config=_as_json(cfg), in_chans=1, num_classes=10, step=1)))
    return folder


def test_reference_rows_are_computed_once_and_reused_only_with_the_same_key(tmp_path):
    from loco_timm.data.datasets import find_fashion_mnist
    from loco_timm.evaluation.readout import readout
    if find_fashion_mnist() is None:
        pytest.skip('Fashion-MNIST not installed')
    cfg = ReadoutConfig(epochs=2, train_subset=200, test_subset=100, knn_k=10)
    cache = tmp_path / 'cache'

    def run(name, cfg=cfg, **overrides):
        logs = []
        result = readout(_checkpoint(tmp_path / name, **overrides), cfg, log=logs.append, reference_cache=cache)
        return result['rows'], [line.split()[0] for line in logs if '(cached:' in line]

    first, hits = run('loco', mode='loco', decoder='conv')
    assert hits == [] and len(list(cache.iterdir())) == 2
    plain = readout(tmp_path / 'loco', cfg, out_dir=tmp_path / 'plain', log=lambda *_: None)['rows']
    assert plain == first  # the cached rows are exactly what a readout without cache computes
    other_arm, hits = run('gim', mode='gim', decoder='mlp')  # other decoders, same encoder init: both rows reused
    assert hits == ['random_init', 'pixels']
    assert {k: other_arm[k] for k in hits} == {k: first[k] for k in hits}
    _, hits = run('seed1', mode='loco', seed=1)  # another initial encoder: only the pixel row is reused
    assert hits == ['pixels'] and len(list(cache.iterdir())) == 3
    _, hits = run('epochs', ReadoutConfig(epochs=3, train_subset=200, test_subset=100, knn_k=10))
    assert hits == [] and len(list(cache.iterdir())) == 5


def _in_memory_linear(x, y, num_classes, cfg):
    """The readout as it was before streaming: every feature standardised at once, then the same SGD."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std
    generator = torch.Generator().manual_seed(cfg.seed)
    linear = torch.nn.Linear(x.shape[1], num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        linear.reset_parameters()
    optimizer = torch.optim.SGD(linear.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, sorted({max(int(round(m * cfg.epochs)), 1) for m in cfg.milestones}), gamma=0.1)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            loss = torch.nn.functional.cross_entropy(linear(xs[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return linear.weight.detach() / std, mean


def test_streamed_float32_readout_equals_the_in_memory_one_and_float16_stays_close():
    x, y = _blobs(n=900, dim=16, scale=1.0)
    cfg = ReadoutConfig(epochs=4, lr=0.1, batch_size=64)
    head = train_linear(x, y, 3, cfg)
    weight, _ = _in_memory_linear(x, y, 3, cfg)
    assert torch.equal(head.weight, weight)  # bit for bit
    half = train_linear(x.half(), y, 3, cfg)
    accuracy = [(h(x).argmax(1) == y).float().mean().item() for h in (head, half)]
    assert abs(accuracy[0] - accuracy[1]) < 0.01
    bank = torch.nn.functional.normalize(x, dim=1)  # kNN as before: one normalisation of all, one query matrix
    sims, idx = (bank[:300] @ bank.T).topk(50, dim=1)
    votes = torch.zeros(300, 3).scatter_add_(1, y[idx], (sims / 0.1).exp())
    assert knn_accuracy(x, y, x[:300], y[:300], 3, k=50) == (votes.argmax(1) == y[:300]).sum().item() / 300
    assert abs(knn_accuracy(x, y, x[:300], y[:300], 3, k=50) -
               knn_accuracy(x.half(), y, x[:300].half(), y[:300], 3, k=50)) < 0.02


def test_features_are_written_into_one_allocation_per_stage_whose_size_is_said_first():
    from torch.utils.data import TensorDataset

    from loco_timm.data.augment import SimCLRAugment
    from loco_timm.evaluation.readout import extract_features
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    dataset = TensorDataset(images, torch.arange(10) % 2, torch.arange(10))
    said = []
    feats, labels = extract_features(None, dataset, SimCLRAugment(8), batch_size=4, dtype=torch.float16,
                                     log=said.append)
    assert said == ['features of 10 images x 64 dims (64) in float16: 0.00 GiB of memory (the learning-rate search '
                    "and kNN each hold one more copy of a stage's at a time)"]
    assert feats[0].dtype == torch.float16 and feats[0].shape == (10, 64) and labels.tolist() == [0, 1] * 5
    expected = SimCLRAugment(8).plain(images).flatten(1).half()
    assert torch.equal(feats[0], expected)
