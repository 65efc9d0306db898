"""Generated README blocks: text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` is rewritten by the
benchmark that produces it, so README tables are never typed by hand."""
from __future__ import annotations

import json
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def replace_block(name: str, text: str, readme: Path = README) -> None:
    """Replace the block ``name`` of ``readme`` with ``text`` (written atomically).

    Raises:
        SystemExit: If the README lacks the block's markers.
    """
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    content = readme.read_text()
    if content.count(start) != 1 or content.count(end) != 1:
        raise SystemExit(f'{readme} needs exactly one {start} ... {end} pair for the generated {name} block')
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = readme.with_suffix('.md.tmp')
    tmp.write_text(f'{head}{start}\n{text.rstrip()}\n{end}{tail}')
    tmp.replace(readme)


def cpu_name() -> str:
    """The CPU's model name, for the machine a benchmark names (as a training run's summary names it)."""
    import torch

    from loco_timm.training.train import machine_name
    return machine_name(torch.device('cpu'))


def write_report(report: dict, out: str | Path, block: str, text: str, readme: bool = True) -> None:
    """Write a benchmark's JSON report to ``out``, print its markdown ``text`` and, with ``readme``, put it into the
    README block ``block``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    print(text)
    if readme:
        replace_block(block, text)
