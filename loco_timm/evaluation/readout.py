"""Evaluation on frozen features: linear readout and kNN for every stage, with reference rows.

The paper's protocol (frozen encoder, linear classifier on pooled features, SGD, learning rate divided by 10 at 30,
60 and 90 % of training) scaled down: features are extracted once without augmentation, standardised (unless
``standardize`` is off, as in the ImageNet recipes, whose lr 30 is the paper's for raw features), and the
classifier is trained on the cached features. Stage k's features are its output pooled as the decoders pool it;
the last stage's are exactly timm's ``forward_head(x, pre_logits=True)``, so its classifier (with the
standardisation folded in) drops into the timm model as ``get_classifier()``. kNN: k nearest training features by
cosine similarity, votes weighted by ``exp(sim / T)`` (as in InstDisc/DINO). The same recipe evaluates two
reference rows: raw pixels and the randomly initialised encoder (same architecture and seed). With ``lr_grid`` the
linear classifier's learning rate is chosen per row and stage on a held-out part of the training split, so every row
gets the rate that suits it and the test split stays unseen. The reference rows do not depend on training, so with
``reference_cache`` they are computed once and reused, keyed by everything they depend on: the readout recipe, the
dataset, its size and subsets, and for the random-init row the encoder's architecture and initial weights (the
study's 18 runs share one pixel row and one random-init row per seed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from ..config import ReadoutConfig, TrainConfig, from_dict
from ..core.learner import LocalLearner
from ..data.augment import SimCLRAugment
from ..data.datasets import build_dataset, normalization
from ..errors import DataError
from ..files import write_text_atomic
from ..training.checkpoint import load_weights, read_progress, resolve_checkpoint
from ..training.factory import build_learner
from .plots import NO_MATPLOTLIB, pyplot

__all__ = ['extract_features', 'train_linear', 'select_lr', 'knn_accuracy', 'evaluate_features', 'readout',
           'plot_readout', 'reference_key']
CACHE_VERSION = 1  # bump when the readout's maths change, so cached reference rows are not reused


@torch.no_grad()
def extract_features(learner: LocalLearner | None, dataset, augment: SimCLRAugment, batch_size: int = 512,
                     device: str | torch.device = 'cpu', dtype: torch.dtype = torch.float32,
                     log=None, num_workers: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled features of every stage (or the flattened pixels when ``learner`` is None) and the labels, held on
    the CPU in ``dtype``, written batch by batch into tensors allocated once (``log`` gets their size first). A
    stream may give fewer images than its announced length (the tensors are cut to what came), not more."""
    if learner is not None:
        learner.eval()
    features, labels, start = None, torch.empty(len(dataset), dtype=torch.long), 0
    for images, targets, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=torch.device(device).type == 'cuda'):
        if start + len(targets) > len(labels):
            raise DataError(f'{dataset.name} gave more than the {len(labels):,} images it announced: correct '
                             f'num_samples in its info file')
        x = augment.plain(images.to(device))
        if learner is None:
            per_stage = [x.flatten(1)]
        else:
            outs = learner(x)
            per_stage = [learner.pool(k, o) for k, o in enumerate(outs[:-1])]
            per_stage.append(learner.encoder.forward_head(outs[-1], pre_logits=True))
        if features is None:
            dims = [f.shape[1] for f in per_stage]
            if log is not None:
                size = len(dataset) * sum(dims) * torch.finfo(dtype).bits / 8
                log(f'features of {len(dataset):,} images x {sum(dims):,} dims ({"+".join(map(str, dims))}) in '
                    f'{str(dtype).split(".")[-1]}: {size / 2 ** 30:.2f} GiB of memory (the learning-rate search and '
                    f'kNN each hold one more copy of a stage\'s at a time)')
            features = [torch.empty(len(dataset), d, dtype=dtype) for d in dims]
        for store, f in zip(features, per_stage):
            store[start:start + len(f)] = f.float().cpu()
        labels[start:start + len(targets)] = targets
        start += len(targets)
    if features is None:
        raise DataError(f'{dataset.name} gave no images: check its split and data_dir')
    return [f[:start] for f in features], labels[:start]


def _standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std + 1e-6 of float32 features, or of lower-precision ones accumulated in float64 over
    chunks (no float32 copy of all of them)."""
    if x.dtype == torch.float32:
        return x.mean(0), x.std(0) + 1e-6
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(65536):
        chunk = chunk.double()
        total += chunk.sum(0)
        squares += chunk.square().sum(0)
    mean = total / len(x)
    var = (squares - len(x) * mean.square()).clamp(min=0) / max(len(x) - 1, 1)
    return mean.float(), var.sqrt().float() + 1e-6


def _predict(head: nn.Linear, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    return torch.cat([head(part.float()).argmax(1) for part in x.split(chunk)])


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, cfg: ReadoutConfig) -> nn.Linear:
    """A linear classifier trained with SGD on the standardised features (or on the raw ones when
    ``cfg.standardize`` is False); the returned layer takes the raw features (standardisation folded into its
    weights)."""
    if cfg.standardize:
        mean, std = _standardisation(train_x)
    else:
        mean, std = torch.zeros(train_x.shape[1]), torch.ones(train_x.shape[1])
    generator = torch.Generator().manual_seed(cfg.seed)
    linear = nn.Linear(train_x.shape[1], num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        linear.reset_parameters()
    optimizer = torch.optim.SGD(linear.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    milestones = sorted({max(int(round(m * cfg.epochs)), 1) for m in cfg.milestones})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(train_x), cfg.batch_size):  # standardised batch by batch: no copy of them all
            batch = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(linear((train_x[batch].float() - mean) / std), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    folded = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_(linear.weight / std)
        folded.bias.copy_(linear.bias - folded.weight @ mean)
    return folded


@torch.no_grad()
def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> float:
    """Top-1 of a weighted kNN classifier on cosine similarity."""
    bank, k = torch.empty_like(train_x), min(k, len(train_x))
    for start in range(0, len(train_x), 65536):  # normalised in chunks, held in the features' dtype
        bank[start:start + 65536] = F.normalize(train_x[start:start + 65536].float(), dim=1)
    correct = 0
    for start in range(0, len(test_x), chunk):
        query = F.normalize(test_x[start:start + chunk].float(), dim=1).to(bank.dtype)
        sims, idx = (query @ bank.T).float().topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes).scatter_add_(1, train_y[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return correct / len(test_x)


def select_lr(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, cfg: ReadoutConfig) -> float:
    """The learning rate of ``cfg.lr_grid`` with the best top-1 on a held-out ``val_fraction`` of the training
    split (seeded; the first of equals), or ``cfg.lr`` without a grid. The test split is never looked at."""
    if not cfg.lr_grid:
        return cfg.lr
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(int(round(cfg.val_fraction * len(train_x))), 1)
    val, fit = order[:n_val], order[n_val:]
    scores = []
    for lr in cfg.lr_grid:
        head = train_linear(train_x[fit], train_y[fit], num_classes, dataclasses.replace(cfg, lr=float(lr)))
        with torch.no_grad():
            scores.append((_predict(head, train_x[val]) == train_y[val]).float().mean().item())
    return float(cfg.lr_grid[scores.index(max(scores))])


def evaluate_features(train: tuple[list, torch.Tensor], test: tuple[list, torch.Tensor], num_classes: int,
                      cfg: ReadoutConfig) -> tuple[dict, nn.Linear]:
    """Linear and kNN top-1 (in %) for every stage (and the linear learning rate used); also the last stage's
    linear head."""
    rows = dict(linear=[], knn=[], lr=[])
    head = None
    for train_x, test_x in zip(train[0], test[0]):
        lr = select_lr(train_x, train[1], num_classes, cfg)
        rows['lr'].append(lr)
        head = train_linear(train_x, train[1], num_classes, dataclasses.replace(cfg, lr=lr))
        with torch.no_grad():
            rows['linear'].append(round(100 * (_predict(head, test_x) == test[1]).float().mean().item(), 2))
        rows['knn'].append(round(100 * knn_accuracy(train_x, train[1], test_x, test[1], num_classes, cfg.knn_k,
                                                    cfg.knn_temperature), 2))
    return rows, head


def _learner_from_checkpoint(checkpoint: Path, random_init: bool = False) -> tuple[LocalLearner, TrainConfig, dict]:
    progress = read_progress(checkpoint)
    cfg = from_dict(TrainConfig, progress['config'], where=f'{checkpoint}/progress.json')
    torch.manual_seed(cfg.seed)
    learner = build_learner(cfg, progress['in_chans'], progress['num_classes'])
    if not random_init:
        load_weights(learner, checkpoint / 'learner.safetensors')
    return learner, cfg, progress


def reference_key(name: str, encoder: LocalLearner | None, cfg: ReadoutConfig, data: dict) -> str:
    """A digest of everything a reference row depends on: the readout recipe, the data (``data``: dataset, folder,
    image size, subset sizes) and, for an encoder, its architecture, stage split and weights."""
    digest = hashlib.sha256(json.dumps(dict(version=CACHE_VERSION, row=name, readout=dataclasses.asdict(cfg),
                                            data=data), sort_keys=True, default=str).encode())
    if encoder is not None:
        digest.update(repr(encoder.encoder).encode())
        digest.update(json.dumps([list(s) for s in encoder.stage_shapes]).encode())
        for key, value in sorted(encoder.encoder.state_dict().items()):
            value = value.detach().cpu().contiguous()
            digest.update(f'{key}:{value.dtype}:{tuple(value.shape)}'.encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2))


def _data_key(train_cfg: TrainConfig, data_dir: str | None, splits: dict, device: str) -> dict:
    """What a reference row depends on of the data: dataset, folder, image size, split sizes, device."""
    data = dict(dataset=train_cfg.dataset, data_dir=str(Path(data_dir).resolve()) if data_dir else None,
                image_size=train_cfg.image_size, train=len(splits['train']), test=len(splits['test']),
                device=torch.device(device).type)
    if train_cfg.splits:  # only when set, so the caches of runs without these keys stay valid
        data['splits'] = train_cfg.splits
    if not train_cfg.decode_draft:
        data['draft'] = False
    return data


def _features(encoder: LocalLearner | None, name: str, splits: dict, augment: SimCLRAugment, cfg: ReadoutConfig,
              device: str, num_workers: int, log) -> dict[str, tuple[list, torch.Tensor]]:
    """Every split's per-stage features (``encoder`` None: the raw pixels) and labels."""
    if encoder is not None:
        encoder.to(device)
    dtype = getattr(torch, cfg.feature_dtype)
    return {split: extract_features(encoder, ds, augment, device=device, dtype=dtype,
                                    log=lambda text, s=split: log(f'{name:12s} {s}: {text}'), num_workers=num_workers)
            for split, ds in splits.items()}


def readout(checkpoint: str | Path, cfg: ReadoutConfig | None = None, out_dir: str | Path | None = None, *,
            device: str = 'cpu', log=print, reference_cache: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (or a run folder's latest) and write ``readout.json``, ``readout.png`` and the last
    stage's classifier ``readout_head.safetensors`` to ``out_dir`` (default: the run folder). With
    ``reference_cache`` (a folder), reference rows computed before with the same key (:func:`reference_key`) are
    read from it instead of being computed again, and new ones are added to it."""
    started = time.perf_counter()
    cfg = cfg or ReadoutConfig()
    checkpoint = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir or checkpoint.parent.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    learner, train_cfg, progress = _learner_from_checkpoint(checkpoint)
    mean, std = normalization(train_cfg.dataset)
    augment = SimCLRAugment(train_cfg.image_size, mean=mean, std=std)
    data_dir = cfg.data_dir or train_cfg.data_dir
    splits = {split: build_dataset(train_cfg.dataset, split, data_dir, train_cfg.image_size, subset,
                                   splits=train_cfg.splits, draft=train_cfg.decode_draft)
              for split, subset in (('train', cfg.train_subset), ('test', cfg.test_subset))}
    num_classes = len(splits['train'].classes)  # a stream without class names: from its labels, below
    encoders = {'model': learner}
    if cfg.references:
        encoders['random_init'] = _learner_from_checkpoint(checkpoint, random_init=True)[0]
        encoders['pixels'] = None
    results: dict[str, Any] = dict(checkpoint=str(checkpoint), step=progress['step'], mode=train_cfg.mode,
                                   backbone=train_cfg.backbone, dataset=train_cfg.dataset,
                                   readout=json.loads(json.dumps(cfg.__dict__)), rows={})
    data = _data_key(train_cfg, data_dir, splits, device)
    for name, encoder in encoders.items():
        cached = None
        if name != 'model' and reference_cache is not None:
            cached = Path(reference_cache) / f'{name}-{reference_key(name, encoder, cfg, data)}.json'
            if cached.is_file():
                results['rows'][name] = json.loads(cached.read_text())
                log(f'{name:12s} linear top-1 per stage: {results["rows"][name]["linear"]}  (cached: {cached})')
                continue
        feats = _features(encoder, name, splits, augment, cfg, device, train_cfg.num_workers, log)
        num_classes = num_classes or int(max(feats['train'][1].max(), feats['test'][1].max())) + 1
        rows, head = evaluate_features(feats['train'], feats['test'], num_classes, cfg)
        results['rows'][name] = rows
        if cached is not None:
            _write_json_atomic(cached, rows)
        log(f'{name:12s} linear top-1 per stage: {rows["linear"]}  kNN: {rows["knn"]}' +
            (f'  (lr {rows["lr"]})' if cfg.lr_grid else ''))
        if name == 'model':
            classifier = learner.encoder.default_cfg.get('classifier', 'fc')
            save_file({f'{classifier}.weight': head.weight.detach().contiguous(),
                       f'{classifier}.bias': head.bias.detach().contiguous()},
                      str(out_dir / 'readout_head.safetensors'))
    results['seconds'] = round(time.perf_counter() - started, 1)
    write_text_atomic(out_dir / 'readout.json', json.dumps(results, indent=2))  # a run's 'read out' mark
    plotted = plot_readout(results, out_dir / 'readout.png')
    log(f'readout of {checkpoint} in {results["seconds"]:.0f} s: {out_dir / "readout.json"}' +
        (f', {out_dir / "readout.png"}' if plotted else f' (no readout.png: {NO_MATPLOTLIB})'))
    return results


def plot_readout(results: dict, path: str | Path) -> bool:
    """Bar chart of linear top-1 per stage for the model and the random-init encoder, pixels as a line; False
    where matplotlib is not installed (nothing written)."""
    plt = pyplot()
    if plt is None:
        return False
    rows = results['rows']
    stages = range(1, len(rows['model']['linear']) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    ax.bar([s - width / 2 for s in stages], rows['model']['linear'], width, label=f'{results["mode"]} (trained)')
    if 'random_init' in rows:
        ax.bar([s + width / 2 for s in stages], rows['random_init']['linear'], width, label='random init')
    if 'pixels' in rows:
        ax.axhline(rows['pixels']['linear'][0], color='k', linestyle='--', linewidth=1, label='raw pixels')
    ax.set_xticks(list(stages))
    ax.set_xlabel('stage')
    ax.set_ylabel('linear top-1 (%)')
    low = min(min(r['linear']) for r in rows.values())
    ax.set_ylim(max(0, low - 10), 100)
    ax.set_title(f'{results["backbone"]} on {results["dataset"]}, step {results["step"]}')
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
