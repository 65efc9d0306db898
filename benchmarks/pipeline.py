"""Stage parallelism on CPU: images/s and per-process memory of LoCo with its stages on 2 processes (synchronous
and pipelined), GIM on 2 processes, and the data-parallel alternatives, against single-process LoCo, all at one
thread per process, measured in one run. Two independent processes, each training single-process LoCo on its own
batch with nothing exchanged, give the most any 2-process configuration can reach on the machine (shared caches and
memory bandwidth, other tenants), so the stage-parallel rows can be read against that ceiling as well as against 2x.

Every configuration trains the same model from the same weights with SGD (momentum 0.9) on random images for
``--warmup`` + ``--steps`` steps; img/s is the global batch over the median time of the timed steps of process 0
(after a barrier per step for the synchronous configurations; the pipelined ones run free, so their median step is
the steady state). Memory per process: parameters it holds plus the peak bytes autograd saves over the timed steps
(:class:`loco_timm.core.memory.SavedTensorMeter`; pipelined, this includes the top stage's graph and weight copies kept
into the next step), the largest over processes. Each stage-parallel configuration gets the
placement ``loco-timm train`` would measure for it (:func:`placements`). Besides the two ResNets
(whose last stage holds most of the parameters) a model of equal blocks, ViT-Ti, shows the parameter split a
time-balanced placement gives when parameters follow compute. The baseline a user would otherwise pick,
end-to-end SimCLR pipeline-parallel, runs through ``torch.distributed.pipelining`` (GPipe, 1 to 8 micro-batches)
with the NT-Xent over the whole batch as GradCache computes it: a forward-only pass for the embeddings, the loss and
its gradient on the last process, then a forward-backward pass seeding each micro-batch with its slice (so every
loss keeps all its negatives, at the price of a second forward). Writes ``benchmarks/results/pipeline_cpu.json``
and the documentation block ``pipeline`` (docs/parallelism.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository's tools/
from doc_blocks import cpu_name, write_report  # noqa: E402

from tools.memory import SavedTensorMeter  # noqa: E402

MODELS = {'loco_resnet18_small': dict(size=28, chans=1, batch=64), 'resnet50': dict(size=128, chans=3, batch=8),
          'vit_tiny_patch16_224': dict(size=224, chans=3, batch=8)}  # the last: a model of equal blocks
EQUAL_BLOCKS = 'vit_tiny_patch16_224'
CONFIGS = {  # name: (mode, processes, how)
    'LoCo, 1 process': ('loco', 1, 'single'),
    'LoCo, 2 stage groups, synchronous': ('loco', 2, 'sync'),
    'LoCo, 2 stage groups, pipelined': ('loco', 2, 'pipelined'),
    'GIM, 2 stage groups': ('gim', 2, 'pipelined'),
    'LoCo, 2 data-parallel processes': ('loco', 2, 'data'),
    # the machine's ceiling for 2 processes: each trains single-process LoCo on its own batch, nothing exchanged
    'LoCo, 2 independent processes (no communication)': ('loco', 2, 'independent'),
    'E2E, 2 data-parallel processes': ('e2e', 2, 'data'),
    **{f'E2E, 2 stage groups, torch pipelining, {m} micro-batches': ('e2e', 2, f'gpipe{m}') for m in (1, 2, 4, 8)},
}


def build(model: str, mode: str, device: torch.device | str = 'cpu'):
    import timm

    from loco_timm import LocalLearner  # importing loco_timm registers the loco_* models
    spec = MODELS[model]
    torch.manual_seed(0)
    backbone = timm.create_model(model, in_chans=spec['chans'])
    return LocalLearner(backbone, mode=mode, input_size=(spec['chans'], spec['size'], spec['size'])).to(device)


def transport(world: int, device: str) -> tuple[str, bool]:
    """The process group's backend for ``world`` processes on ``device`` and whether ``torch.distributed.pipelining``
    can run there: NCCL with one GPU per process; with fewer GPUs than processes (several sharing one, a valid check of
    the schedule) gloo, which stages the tensors on the CPU and which the pipelining schedules cannot use with CUDA
    tensors."""
    if device != 'cuda':
        return 'gloo', True
    return ('nccl', True) if world <= torch.cuda.device_count() else ('gloo', False)


def placements(model: str, batch: int, device: str = 'cpu') -> tuple[dict[str, list], dict]:
    """Each stage-parallel configuration's placement, balanced as ``loco-timm train`` balances it: by the stages'
    measured step times (:func:`loco_timm.training.stage_training.step_costs`, one thread; forward and backward with the
    units' decoders and losses; E2E by its own stage costs). Also the cost model of pipelined LoCo: the measured
    costs, each process's share of one step and the speed-up they estimate (single-process step over the largest
    process's; transfers and overlap not counted)."""
    from loco_timm.training.placement import step_costs
    from loco_timm.training.stage_parallel import balance
    torch.set_num_threads(1)
    spec, found = MODELS[model], {}
    h = torch.randn(2 * batch, spec['chans'], spec['size'], spec['size'], device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
        costs = {mode: step_costs(build(model, mode, device), h) for mode in ('loco', 'gim', 'e2e')}
    for config, (mode, processes, how) in CONFIGS.items():
        if processes > 1 and how not in ('data', 'independent'):
            found[config] = balance(costs[mode], 2)
    step = costs['loco']
    loads = [sum(step[k] for k in g) for g in found['LoCo, 2 stage groups, pipelined']]
    model_of_cost = dict(step_s=[round(c, 4) for c in step], process_loads=[round(x / sum(step), 2) for x in loads],
                         estimate=round(sum(step) / max(loads), 2))
    return found, model_of_cost


class _Part(torch.nn.Module):
    """A pipeline stage for ``torch.distributed.pipelining``: a group of the learner's stages (the last group also
    runs the E2E projection head on the last stage's feature)."""

    def __init__(self, learner, stages: list[int]):
        super().__init__()
        self.learner_stages = torch.nn.ModuleList([learner.stages[k] for k in stages])
        last = len(learner.stages) - 1
        self.head = learner.decoders[0] if stages[-1] == last else None
        self.feature = (lambda h: learner.feature(last, h))

    def forward(self, x):
        for stage in self.learner_stages:
            x = stage(x)
        return self.head(self.feature(x)) if self.head is not None else x.contiguous()  # sent as it is laid out


def _gpipe_step(schedule, rank: int, world: int, views, microbatches: int, temperature: float) -> None:
    """E2E SimCLR through a GPipe schedule with the NT-Xent over the whole batch, as GradCache does: a forward-only
    pass gives every micro-batch's embeddings, the loss of the whole batch gives their gradients, and a second pass
    backpropagates each micro-batch's slice (loss = embeddings . gradient)."""
    from loco_timm.core.losses import nt_xent_loss
    n = views[0].shape[0] // microbatches if views is not None else 0
    x = torch.cat([torch.cat([v[m * n:(m + 1) * n] for v in views]) for m in range(microbatches)]) \
        if rank == 0 else None
    # the schedule's loss runs in eval too: a zero target per micro-batch makes it a no-op there
    out = schedule.eval(x) if rank == 0 else schedule.eval(target=torch.zeros(microbatches))
    target = None
    if rank == world - 1:
        z = out.detach().requires_grad_()
        chunks = z.chunk(microbatches)
        half = chunks[0].shape[0] // 2
        nt_xent_loss(torch.cat([c[:half] for c in chunks]), torch.cat([c[half:] for c in chunks]), temperature,
                     gather=False).backward()
        target = z.grad
    if rank == 0:
        schedule.step(x)
    else:
        schedule.step(target=target)


def worker(rank: int, world: int, port: int, model: str, config: str, placement: list, warmup: int, steps: int,
           out: str, batch: int, device_type: str = 'cpu') -> None:
    import torch.distributed as dist

    from loco_timm.training.stage_parallel import StageParallel
    torch.set_num_threads(1)
    mode, _, how = CONFIGS[config]
    spec = MODELS[model]
    device = torch.device('cpu')
    if device_type == 'cuda':
        device = torch.device('cuda', rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend, _ = transport(world, device_type)
    if world > 1:
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        dist.init_process_group(backend, rank=rank, world_size=world)
    learner = build(model, mode, device)
    batch //= world if how == 'data' else 1
    sp = StageParallel(learner, placement, pipelined=how == 'pipelined') if how in ('sync', 'pipelined') else None
    params = sp.parameters() if sp is not None else list(learner.parameters())
    schedule = None
    if how.startswith('gpipe'):
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
        part = _Part(learner, placement[rank])
        params = list(part.parameters())
        stage = PipelineStage(part, rank, world, device)
        schedule = ScheduleGPipe(stage, n_microbatches=int(how[5:]), loss_fn=lambda out, grad: (out * grad).sum(),
                                 scale_grads=False)  # each micro-batch's slice of the whole-batch gradient
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(batch, spec['chans'], spec['size'], spec['size'], generator=g).to(device) for _ in range(2)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')
    times = []
    # one meter over all steps: pipelined, a top stage's graph lives into the next step
    with SavedTensorMeter(exclude=params) as meter:
        for i in range(warmup + steps):
            if world > 1 and how not in ('pipelined', 'independent'):
                dist.barrier()
            if i == warmup:
                meter.reset_peak()
            _sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                if schedule is not None:
                    _gpipe_step(schedule, rank, world, views, int(how[5:]), learner.loss.temperature)
                elif sp is not None:
                    sp.step(*views, device=device) if rank == 0 else sp.step(device=device)
                else:
                    learner.step(*views)
            if how == 'data':  # one all-reduce of every gradient, as `loco-timm train` averages them
                grads = [p.grad for p in params if p.grad is not None]
                flat = torch.cat([g.reshape(-1) for g in grads])
                flat = flat if backend == 'nccl' else flat.cpu()  # gloo reduces CPU tensors
                dist.all_reduce(flat)
                parts = (flat.to(grads[0].device) / world).split([g.numel() for g in grads])
                for g, part in zip(grads, parts):
                    g.copy_(part.view_as(g))
            optimizer.step()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        peak = meter.peak
    if sp is not None and sp.pipelined:
        sp.finish()
    held = sum(p.numel() * p.element_size() for p in params)
    Path(f'{out}.{rank}').write_text(json.dumps(dict(step_s=statistics.median(times), held=held, saved=peak)))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(model: str, config: str, placement: list, warmup: int, steps: int, batch: int, device: str = 'cpu') -> dict:
    world = CONFIGS[config][1]
    with tempfile.TemporaryDirectory() as tmp:
        out, port = str(Path(tmp) / 'result'), _free_port()
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        procs = [subprocess.Popen([sys.executable, __file__, '--worker', json.dumps(dict(
            rank=r, world=world, port=port, model=model, config=config, placement=placement, warmup=warmup,
            steps=steps, out=out, batch=batch, device_type=device))], env=env) for r in range(world)]
        for p in procs:
            if p.wait(timeout=3600):
                raise SystemExit(f'{config} on {model}: a process failed')
        ranks = [json.loads(Path(f'{out}.{r}').read_text()) for r in range(world)]
    step = ranks[0]['step_s']
    images = batch * (world if CONFIGS[config][2] == 'independent' else 1)  # each process its own whole batch
    return dict(img_per_s=round(images / step, 2), step_s=round(step, 4),
                memory_mb=round(max(r['held'] + r['saved'] for r in ranks) / 2 ** 20, 1),
                params_mb=[round(r['held'] / 2 ** 20, 1) for r in ranks])


def markdown(report: dict) -> str:
    command = 'python benchmarks/pipeline.py' + (' --device cuda' if report.get('device') == 'cuda' else '')
    how = 'bf16 autocast, ' + report.get('backend', '') if report.get('device') == 'cuda' else 'one thread per process'
    lines = [f'{how[0].upper()}{how[1:]} (`{command}`; `--models M` measures one model again); each model\'s '
             f'ratios come from one invocation on one machine (`--repeat R`: every configuration R times round '
             f'robin):', '']
    for model, rows in report['models'].items():
        spec = MODELS[model]
        base = rows['LoCo, 1 process']['img_per_s']
        when = report.get('measured', {}).get(model, dict(date=report['date'], machine=report['machine']))
        repeat = report.get('repeat', {}).get(model, 1)
        lines += [f'{model} at {spec["size"]} px, batch {report.get("batch", {}).get(model, spec["batch"])}, measured '
                  f'{when["date"]} on {when["machine"]}' + (f', every configuration {repeat} times round robin '
                  f'(`--repeat {repeat}`): the median run, and in brackets every run\'s img/s' if repeat > 1 else '')
                  + ':', '',
                  '| configuration | placement | img/s | vs 1-process LoCo | peak memory per process (MB) | '
                  'parameters per process (MB) |', '|---|---|---:|---:|---:|---|']
        for name, row in rows.items():
            where = report['placements'][model].get(name, '')
            if 'skipped' in row:
                lines.append(f'| {name} | {where} | not run: {row["skipped"]} | | | |')
                continue
            every = f' ({", ".join(map(str, row["img_per_s_runs"]))})' if 'img_per_s_runs' in row else ''
            lines.append(f'| {name} | {where} | {row["img_per_s"]}{every} | {row["img_per_s"] / base:.2f}x | '
                         f'{row["memory_mb"]} | {", ".join(map(str, row["params_mb"]))} |')
        cost = report.get('cost_model', {}).get(model)
        if cost:
            lines += ['', f'Placement cost model of pipelined LoCo (stage step times {cost["step_s"]} s): the '
                          f'processes carry {cost["process_loads"]} of one '
                          f'single-process step, an estimated speed-up of {cost["estimate"]}x.']
        ceiling = rows.get('LoCo, 2 independent processes (no communication)', {}).get('img_per_s')
        if ceiling:
            lines.append(f'Two independent processes, each training single-process LoCo on its own batch with nothing '
                         f'exchanged, reach {ceiling / base:.2f}x one process: the most 2 processes give on this '
                         f'machine for this model. Pipelined LoCo reaches '
                         f'{rows["LoCo, 2 stage groups, pipelined"]["img_per_s"] / ceiling:.2f} of that.')
        held = rows['LoCo, 2 stage groups, pipelined']['params_mb']
        lines.append(f'Pipelined LoCo: the processes hold {" / ".join(f"{x / sum(held):.2f}" for x in held)} of the '
                     f'parameters (stages and decoders).')
        lines.append('')
    return '\n'.join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--worker':
        return worker(**json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--steps', type=int, default=6)
    parser.add_argument('--repeat', type=int, default=1,
                        help='measure every configuration R times, round robin, and report the median run (the '
                             'machine\'s speed drifts between configurations measured one after another)')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu',
                        help='cuda: one process per GPU over NCCL, or 2 processes sharing one GPU over gloo')
    parser.add_argument('--batch-scale', type=int, default=1, help='multiply each model\'s batch (e.g. 8 on a GPU)')
    parser.add_argument('--out', help='default: benchmarks/results/pipeline_{cpu,gpu}.json')
    parser.add_argument('--no-readme', action='store_true')
    parser.add_argument('--readme-only', action='store_true',
                        help='measure nothing: rewrite the documentation block from the --out JSON (e.g. one a GPU '
                             'machine wrote with --no-readme)')
    args = parser.parse_args()
    gpu = args.device == 'cuda'
    out = args.out or f'benchmarks/results/pipeline_{"gpu" if gpu else "cpu"}.json'
    if args.readme_only:
        if not Path(out).is_file():
            raise SystemExit(f'{out} does not exist: measure first (leave out --readme-only)')
        report = json.loads(Path(out).read_text())
        return write_report(report, out, 'pipeline-gpu' if report.get('device') == 'cuda' else 'pipeline',
                            markdown(report))
    if gpu and not torch.cuda.is_available():
        raise SystemExit('--device cuda needs a CUDA GPU; leave it out to measure on the CPU')
    backend, pipelining = transport(2, args.device)
    report = dict(date=str(date.today()), machine=torch.cuda.get_device_name() if gpu else cpu_name(),
                  device=args.device, backend=backend, models={}, placements={}, cost_model={}, batch={}, measured={},
                  repeat={})
    if Path(out).is_file():  # the models not measured again keep their rows, with the date and machine of their run
        kept = json.loads(Path(out).read_text())
        for model in kept['models']:
            if model not in args.models and model in MODELS:
                for key in ('models', 'placements', 'cost_model', 'batch', 'repeat'):
                    if model in kept.get(key, {}):
                        report[key][model] = kept[key][model]
                report['measured'][model] = kept.get('measured', {}).get(
                    model, dict(date=kept['date'], machine=kept['machine']))
    for model in args.models:
        report['measured'][model] = dict(date=report['date'], machine=report['machine'])
        batch = report['batch'][model] = MODELS[model]['batch'] * args.batch_scale
        found, report['cost_model'][model] = placements(model, batch, args.device)
        report['placements'][model] = found
        runs = {config: [] for config in CONFIGS}
        for _ in range(args.repeat):  # round robin: a drift of the machine's speed reaches every configuration
            for config in CONFIGS:
                if 'torch pipelining' in config and not pipelining:
                    runs[config] = [dict(skipped='2 processes share one GPU: NCCL needs one GPU per process')]
                    continue
                runs[config].append(run(model, config, found.get(config, [[0]]), args.warmup, args.steps, batch,
                                        args.device))
                print(model, config, runs[config][-1], flush=True)
        report['models'][model] = {config: _median_run(measured) for config, measured in runs.items()}
        if args.repeat > 1:
            report['repeat'][model] = args.repeat
    report['models'] = {m: report['models'][m] for m in MODELS if m in report['models']}  # the table order
    report.update(ratios(report['models']))
    write_report(report, out, 'pipeline-gpu' if gpu else 'pipeline', markdown(report), readme=not args.no_readme)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median img/s (of an even number, the lower middle one), and every run's img/s when there
    are several."""
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: r['img_per_s'])
    return dict(ordered[(len(ordered) - 1) // 2], img_per_s_runs=[r['img_per_s'] for r in runs])


def ratios(models: dict) -> dict:
    """The headline ratios: pipelined LoCo at P = 2 against single-process LoCo and against E2E through
    ``torch.distributed.pipelining`` with 4 micro-batches (ResNet-50), and the same with the parameter shares on the
    model of equal blocks, where a time-balanced placement also splits the parameters."""
    found = {}

    def pair(rows: dict) -> dict:
        pipelined, gpipe = rows['LoCo, 2 stage groups, pipelined'], rows[
            'E2E, 2 stage groups, torch pipelining, 4 micro-batches']
        return dict(pipelined_loco_vs_single_process_loco=round(
            pipelined['img_per_s'] / rows['LoCo, 1 process']['img_per_s'], 2),
            pipelined_loco_vs_e2e_pipeline_m4=round(pipelined['img_per_s'] / gpipe['img_per_s'], 2)
            if 'img_per_s' in gpipe else None)
    if EQUAL_BLOCKS in models:
        held = models[EQUAL_BLOCKS]['LoCo, 2 stage groups, pipelined']['params_mb']
        found['equal_blocks'] = dict(model=EQUAL_BLOCKS, **pair(models[EQUAL_BLOCKS]),
                                     parameter_shares=[round(x / sum(held), 2) for x in held])
    if 'resnet50' in models:
        found.update(pair(models['resnet50']))
    return found


if __name__ == '__main__':
    main()
