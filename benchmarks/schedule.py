"""What local learning saves: peak activation memory and step time of E2E, GIM and LoCo, as ratios to E2E.

Memory is the peak of live bytes autograd saves for backward during ``LocalLearner.step`` (each storage once, no
parameters; :class:`tools.memory.SavedTensorMeter`), which is deterministic on CPU. Time is the median of several steps
after warm-up (noisy on shared machines: compare ratios from one run, not absolute times across runs). Configurations:
the same decoder on both sides (mlp everywhere: the schedule's own cost), the paper's (conv decoders for GIM/LoCo
against E2E with mlp), and LoCo with recomputation. Also the loader's img/s for the small-image recipe next to its model
img/s. Writes JSON and a markdown table.

    .venv/bin/python benchmarks/schedule.py --out benchmarks/results/schedule_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tools/
from doc_blocks import replace_block  # noqa: E402

import loco_timm  # noqa: E402,F401  (registers loco_* models)
from loco_timm import LocalLearner  # noqa: E402
from tools.memory import SavedTensorMeter, saved_bytes  # noqa: E402

MODELS = {  # name: (timm model, input size, batch per view, model arguments)
    'resnet50': ('resnet50', (3, 224, 224), 4, {}),
    'loco_resnet18_small': ('loco_resnet18_small', (1, 28, 28), 128, {}),
    'convnext_atto': ('convnext_atto', (3, 128, 128), 8, {}),
    'vit_tiny': ('vit_tiny_patch16_224', (3, 224, 224), 4, {'img_size': 224}),
    # families split by the generic (traced) splitter
    'swin_tiny': ('swin_tiny_patch4_window7_224', (3, 224, 224), 2, {}),  # windowed transformer, NHWC maps
    'densenet121': ('densenet121', (3, 128, 128), 4, {}),  # densely connected CNN
    'pvt_v2_b0': ('pvt_v2_b0', (3, 128, 128), 8, {}),  # pyramid ViT
    'coatnet_nano': ('coatnet_nano_rw_224', (3, 224, 224), 2, {}),  # hybrid conv/attention (MaxxViT family)
    # the paper's other encoders (loco_timm.zoo)
    'shufflenet_v2_50': ('loco_shufflenet_v2_50', (3, 224, 224), 4, {}),
    'presnet50': ('loco_presnet50', (3, 224, 224), 2, {}),
}
# memory saving vs E2E the paper reports (conv decoders, units trained one after another)
PAPER_SAVINGS = {'resnet50': {'gim': 1.81, 'loco': 1.28}, 'presnet50': {'gim': 4.56, 'loco': 2.76}}
CONFIGS = [('e2e', 'mlp', False), ('gim', 'mlp', False), ('loco', 'mlp', False), ('gim', 'conv', False),
           ('loco', 'conv', False), ('loco', 'mlp', True), ('loco', 'conv', True)]


def measure(model_name: str, input_size: tuple, batch: int, kwargs: dict, mode: str, decoder: str, recompute: bool,
            steps: int) -> dict:
    torch.manual_seed(0)
    backbone = timm.create_model(model_name, in_chans=input_size[0], **kwargs)
    learner = LocalLearner(backbone, mode=mode, decoder=decoder, input_size=input_size, recompute=recompute)
    views = [torch.randn(batch, *input_size) for _ in range(2)]
    with SavedTensorMeter(exclude=list(learner.parameters())) as meter:
        learner.step(*views)
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        learner.zero_grad(set_to_none=True)
        start = time.perf_counter()
        learner.step(*views)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    return dict(mode=mode, decoder=decoder, recompute=recompute, peak_saved_bytes=meter.peak, step_seconds=step,
                img_per_s=round(batch / step, 1))  # images (two views each) per second


def stage_shares(model_name: str, input_size: tuple, batch: int, kwargs: dict) -> dict[str, list[float]]:
    """Percent of the network's activations each stage saves for backward (each stage measured alone on its input),
    and what a conv decoder on each stage's output saves, in percent of the same total."""
    from loco_timm.core.stages import detach_stage_output, stage_tensors
    torch.manual_seed(0)
    learner = LocalLearner(timm.create_model(model_name, in_chans=input_size[0], **kwargs), mode='e2e',
                           input_size=input_size)
    h, params, saved, decoders = torch.randn(2 * batch, *input_size), list(learner.parameters()), [], []
    for k, stage in enumerate(learner.stages):
        saved.append(saved_bytes(lambda x, stage=stage: stage_tensors(stage(x)), detach_stage_output(h, True),
                                 exclude=params))
        with torch.no_grad():
            h = stage(h)
        decoder = LocalLearner(learner.encoder, mode='gim', decoder='conv', input_size=input_size).decoders[k]
        x = detach_stage_output(learner.feature(k, h), True)  # already counted (the next stage saves it)
        decoders.append(saved_bytes(decoder, x, exclude=[*decoder.parameters(), *stage_tensors(x)]))
    return dict(stages=[round(100 * s / sum(saved), 1) for s in saved],
                conv_decoders=[round(100 * d / sum(saved), 1) for d in decoders])


def loader_throughput(batch: int = 128, batches: int = 20) -> float | None:
    """img/s of the small-image recipe's input pipeline: Fashion-MNIST uint8 batches and both SimCLR views."""
    from torch.utils.data import DataLoader

    from loco_timm.data.augment import SimCLRAugment
    from loco_timm.data.datasets import NORMALIZATION, build_dataset, find_fashion_mnist
    if find_fashion_mnist() is None:
        return None
    dataset = build_dataset('fashion_mnist', 'pretrain', None, 28, None)
    mean, std = NORMALIZATION['fashion_mnist']
    augment = SimCLRAugment(28, scale=(0.4, 1.0), mean=mean, std=std)
    loader = iter(DataLoader(dataset, batch_size=batch, shuffle=True))
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        images, _, index = next(loader)
        augment(images, index, 0, 0, 0), augment(images, index, 0, 0, 1)
        seen += len(images)
    return round(seen / (time.perf_counter() - start), 1)


def table(results: dict) -> str:
    lines = ['| model (input, batch/view) | mode | decoder | recompute | peak saved activations | '
             'memory saving vs E2E | step time vs E2E |', '|---|---|---|---|---|---|---|']
    for name, entry in results['models'].items():
        base = next(r for r in entry['runs'] if r['mode'] == 'e2e')
        for r in entry['runs']:
            lines.append(f'| {name} ({"x".join(map(str, entry["input_size"]))}, {entry["batch"]}) | {r["mode"]} | '
                         f'{r["decoder"]} | {"yes" if r["recompute"] else "no"} | '
                         f'{r["peak_saved_bytes"] / 2**20:.1f} MiB | '
                         f'{base["peak_saved_bytes"] / r["peak_saved_bytes"]:.2f}x | '
                         f'{r["step_seconds"] / base["step_seconds"]:.2f}x |')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up step')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--out', default='benchmarks/results/schedule_cpu.json')
    parser.add_argument('--shares', action='store_true', help='only print each stage\'s share of the activations')
    parser.add_argument('--markdown', action='store_true', help='only rewrite the .md of an existing --out JSON')
    parser.add_argument('--no-readme', action='store_true', help='do not rewrite the documentation block')
    args = parser.parse_args()
    if args.markdown:
        write_markdown(json.loads(Path(args.out).read_text()), Path(args.out), readme=not args.no_readme)
        return
    if args.shares:
        for name in args.models:
            shares = stage_shares(*MODELS[name])
            print(f'{name}: activation share per stage (%): {shares["stages"]}; a conv decoder on each stage\'s '
                  f'output (% of the same total): {shares["conv_decoders"]}')
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = dict(device='cpu', threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
                   machine=platform.machine(), steps=args.steps, models={})
    for name in args.models:
        model_name, input_size, batch, kwargs = MODELS[name]
        runs = []
        for mode, decoder, recompute in CONFIGS:
            runs.append(measure(model_name, input_size, batch, kwargs, mode, decoder, recompute, args.steps))
            print(f'{name} {mode} {decoder} recompute={recompute}: {runs[-1]}', flush=True)
        results['models'][name] = dict(input_size=input_size, batch=batch, runs=runs)
    # the loader is compared with the small model's step: measured in the same run as it
    results['loader_img_per_s'] = loader_throughput() if 'loco_resnet18_small' in args.models else None
    out = Path(args.out)
    if set(args.models) != set(MODELS) and out.exists():  # other models' rows stay from the last run
        old = json.loads(out.read_text())
        if (old['torch'], old['timm'], old['threads']) == (results['torch'], results['timm'], results['threads']):
            results['models'] = {**old['models'], **results['models']}
            results['loader_img_per_s'] = results['loader_img_per_s'] or old.get('loader_img_per_s')
        else:
            print(f'{out} was measured with other versions or threads: written without its other models')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    write_markdown(results, out, readme=not args.no_readme and set(results['models']) == set(MODELS))


def write_markdown(results: dict, out: Path, readme: bool = True) -> None:
    """The table and notes (``out`` with suffix .md) from a results JSON, also as the documentation's schedule block."""
    text = table(results)
    big = results['models'].get('resnet50')
    if big:
        rates = {f'{r["mode"]} ({r["decoder"]} decoder)': r['img_per_s'] for r in big['runs']
                 if not r['recompute'] and (r['mode'], r['decoder']) in (('e2e', 'mlp'), ('loco', 'conv'))}
        years = {k: 800 * 1_281_167 / v / (365.25 * 24 * 3600) for k, v in rates.items()}
        text += ('\n\nThe ImageNet recipe (800 epochs x 1,281,167 images) at the ResNet-50 rates above: ' +
                 ', '.join(f'{k} {rates[k]} img/s -> {years[k]:.0f} years' for k in rates) + '.')
    small = results['models'].get('loco_resnet18_small')
    if small and results['loader_img_per_s']:
        model = next(r for r in small['runs'] if r['mode'] == 'loco' and r['decoder'] == 'conv' and not r['recompute'])
        text += (f'\n\nInput pipeline of the Fashion-MNIST recipe: {results["loader_img_per_s"]:,.0f} img/s (uint8 '
                 f'batches + two batched SimCLR views) vs {model["img_per_s"]:,.0f} img/s for the LoCo step of '
                 f'loco_resnet18_small (batch 128 per view).')
    paper = [(name, results['models'][name], want) for name, want in PAPER_SAVINGS.items() if name in results['models']]
    if paper:
        def saving(entry, mode):
            runs = {(r['mode'], r['decoder'], r['recompute']): r['peak_saved_bytes'] for r in entry['runs']}
            return runs[('e2e', 'mlp', False)] / runs[(mode, 'conv', False)]
        text += ('\n\nMemory saving with the paper\'s conv decoders, measured here (paper): ' + '; '.join(
            f'{name} GIM {saving(entry, "gim"):.2f}x ({want["gim"]}x), LoCo {saving(entry, "loco"):.2f}x '
            f'({want["loco"]}x)' for name, entry, want in paper) + '.')
    out.with_suffix('.md').write_text(text + '\n')
    if readme:
        replace_block('schedule', text)
    print(text)


if __name__ == '__main__':
    main()
