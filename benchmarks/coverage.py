"""Coverage of timm's model families: the smallest model of each, split and trained one LoCo step.

    .venv/bin/python benchmarks/coverage.py                      # every family of the installed timm
    .venv/bin/python benchmarks/coverage.py --families resnet swin_transformer   # these rows of the report again
    .venv/bin/python benchmarks/coverage.py --reuse-picks        # the models of the last report, no meta scan
    .venv/bin/python benchmarks/coverage.py --largest-under 30e6 --no-readme --out benchmarks/results/coverage_largest
                                                                 # each family's largest model under 30 M parameters
    PYTHONPATH=.venv/oldest-timm-1.0.12 .venv/bin/python benchmarks/coverage.py --no-readme \
        --reuse-picks benchmarks/results/coverage.json --out benchmarks/results/coverage_timm-1.0.12

Writes ``benchmarks/results/coverage.json`` (one row per family: model, input size, stages, feature shapes and
layouts, composition check, LoCo step, seconds, or the reason it fails) and ``coverage.md``, and rewrites the
table of docs/backbones.md ("Supported backbone families") between its markers. The protocol is
:func:`tools.coverage.check_model`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from doc_blocks import replace_block  # noqa: E402

from tools.coverage import check_model, largest_models, param_count, smallest_models  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results'


def _cell(value) -> str:
    return str(value).replace('|', '/').replace('\n', ' ')


def markdown(report: dict) -> str:
    rows = report['families']
    ok = [r for r in rows if r.get('ok')]
    others = f', {len(rows) - len(ok)} fail or were not run' if len(ok) < len(rows) else ''
    lines = [f'{len(ok)} of {len(rows)} timm model families pass{others} (timm {report["timm"]}, '
             f'torch {report["torch"]}, '
             f'{report["date"]}; written by `{report.get("command", ".venv/bin/python benchmarks/coverage.py")}`). Per '
             f'family: {report.get("pick", "its smallest model")}, untrained, at {report["side"]} px (where it does '
             f'not run: its smallest input size, else its own); default stages composed equal '
             f'`forward_features` (eval), one LoCo step gives every parameter `forward_features` uses a gradient, and '
             f'the top unit alone leaves the first stage\'s own parameters (those no stage of the top unit reads) '
             f'without one.', '',
             '| family | model | input | stages | feature layouts | LoCo step | seconds |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        if r.get('ok'):
            layouts = ', '.join('+'.join(x) if isinstance(x, list) else x for x in r['layouts'])
            size = 'x'.join(str(v) for v in r['input_size'][1:])
            lines.append(f'| {r["family"]} | `{r["model"]}` | {size} | {r["stages"]} | {layouts} | ok | '
                         f'{r["seconds"]} |')
    failing = [r for r in rows if not r.get('ok') and not r.get('not_run')]
    if failing:
        lines += ['', 'Not supported yet, with the reason:', '', '| family | model | reason |', '|---|---|---|']
        lines += [f'| {r["family"]} | `{r.get("model")}` | {_cell(r.get("reason", ""))} |' for r in failing]
    skipped = [r for r in rows if r.get('not_run')]
    if skipped:
        lines += ['', 'Not run here:', '', '| family | model | reason |', '|---|---|---|']
        lines += [f'| {r["family"]} | `{r.get("model")}` | {_cell(r.get("reason", ""))} |' for r in skipped]
    return '\n'.join(lines) + '\n'


def timm_families() -> list[str]:
    """timm's own model modules (not the ones plugins such as loco_timm register)."""
    return [m for m in timm.list_modules() if importlib.util.find_spec(f'timm.models.{m}') is not None]


def _merged(report: dict, previous: Path) -> dict:
    """``report`` (some families) with the other families' rows of the previous report of the same timm and side."""
    if not previous.exists():
        return report
    old = json.loads(previous.read_text())
    if (old['timm'], old['side']) != (report['timm'], report['side']):
        raise SystemExit(f'coverage.py: {previous} is for timm {old["timm"]} at {old["side"]} px, not timm '
                         f'{report["timm"]} at {report["side"]} px: run all families, or give another --out')
    new = {r['family']: r for r in report['families']}
    rows = [new.pop(r['family'], r) for r in old['families']] + list(new.values())
    return dict(report, families=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--families', nargs='*', help='timm module names (default: all)')
    parser.add_argument('--reuse-picks', nargs='?', type=Path, const=True, default=None, metavar='COVERAGE_JSON',
                        help='take the models of a report (default: the last coverage.json in --out); a family '
                             'whose model is missing there or in this timm is scanned again')
    parser.add_argument('--side', type=int, default=128)
    parser.add_argument('--out', type=Path, default=RESULTS)
    parser.add_argument('--max-params', type=float, default=500e6,
                        help='families whose smallest model is larger are listed as not run (default 500e6)')
    parser.add_argument('--no-readme', action='store_true', help='do not rewrite the documentation block')
    parser.add_argument('--largest-under', type=float, default=None, metavar='PARAMS',
                        help='check each family\'s largest model under PARAMS parameters instead of its smallest (a '
                             'second sample of every family; e.g. 30e6 with --out benchmarks/results/coverage_largest)')
    args = parser.parse_args()
    warnings.filterwarnings('ignore')
    torch.set_num_threads(max(1, torch.get_num_threads()))
    families = args.families or timm_families()
    previous = args.out / 'coverage.json' if args.reuse_picks is True else args.reuse_picks
    if previous is not None and not previous.exists() and args.reuse_picks is not True:
        raise SystemExit(f'coverage.py: --reuse-picks {previous}: no such file; give a coverage.json or omit the path')
    if previous is not None and previous.exists():
        picks = {r['family']: r.get('model') for r in json.loads(previous.read_text())['families']}
        picks = {f: picks.get(f) if picks.get(f) in timm.list_models(module=f) else None for f in families}
        missing = [f for f, m in picks.items() if m is None]
        picks.update(smallest_models(missing) if missing else {})
    elif args.largest_under:
        picks = largest_models(families, args.largest_under)
    else:
        picks = smallest_models(families)
    rows = []
    for family in families:
        model = picks.get(family)
        size = param_count(model) if model else 0
        if not model:
            row = dict(family=family, model=None, ok=False, not_run=True,
                       reason='no model of the family builds' + (f' under {args.largest_under / 1e6:g} M parameters'
                                                                if args.largest_under else ''))
        elif size > args.max_params:
            row = dict(family=family, model=model, ok=False, not_run=True,
                       reason=f'not run: its smallest model has {size / 1e6:.0f} M parameters, over --max-params '
                              f'{args.max_params / 1e6:.0f} M (too slow for 2 CPU cores)')
        else:
            row = dict(family=family, **check_model(model, side=args.side))
        rows.append(row)
        print(f'{family:28s} {str(model):40s} {"ok" if row["ok"] else "FAIL " + row.get("reason", "")} '
              f'({row.get("seconds", 0)} s)', flush=True)
    report = dict(timm=timm.__version__, torch=torch.__version__, python=platform.python_version(),
                  date=time.strftime('%Y-%m-%d'), side=args.side, families=rows,
                  command=' '.join(['.venv/bin/python benchmarks/coverage.py', *sys.argv[1:]]),
                  pick=(f'its largest model under {args.largest_under / 1e6:g} M parameters' if args.largest_under
                        else 'its smallest model'))
    report = _merged(report, args.out / 'coverage.json') if args.families else report
    rows = report['families']
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'coverage.json').write_text(json.dumps(report, indent=1) + '\n')
    text = markdown(report)
    (args.out / 'coverage.md').write_text(text)
    if not args.no_readme:
        replace_block('coverage', text)
    print(f'{sum(r["ok"] for r in rows)} of {len(rows)} families pass; wrote {args.out}/coverage.json, coverage.md')


if __name__ == '__main__':
    main()
