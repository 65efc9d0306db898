"""Generated documentation blocks: text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in the README or a
page of ``docs/`` is rewritten by the benchmark that produces it, so its tables are never typed by hand."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pages(root: Path = ROOT) -> list[Path]:
    """The files that may hold generated blocks: the README and every page of the documentation."""
    return [root / 'README.md', *sorted((root / 'docs').glob('**/*.md'))]


def replace_block(name: str, text: str, root: Path = ROOT) -> list[Path]:
    """Replace the block ``name`` with ``text`` in every page that holds its markers (written atomically); returns
    those pages.

    Raises:
        SystemExit: If no page holds the block's markers, or one holds them more than once.
    """
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    written = []
    for page in pages(root):
        content = page.read_text() if page.is_file() else ''
        if start not in content:
            continue
        if content.count(start) != 1 or content.count(end) != 1:
            raise SystemExit(f'{page} needs exactly one {start} ... {end} pair for the generated {name} block')
        head, rest = content.split(start, 1)
        _, tail = rest.split(end, 1)
        tmp = page.with_suffix('.md.tmp')
        tmp.write_text(f'{head}{start}\n{text.rstrip()}\n{end}{tail}')
        tmp.replace(page)
        written.append(page)
    if not written:
        raise SystemExit(f'no page of {root} (README.md, docs/) holds {start} ... {end} for the generated {name} block')
    return written


def cpu_name() -> str:
    """The CPU's model name, for the machine a benchmark names (as a training run's summary names it)."""
    import torch

    from loco_timm.training.train import machine_name
    return machine_name(torch.device('cpu'))


def write_report(report: dict, out: str | Path, block: str, text: str, readme: bool = True) -> None:
    """Write a benchmark's JSON report to ``out``, print its markdown ``text`` and, with ``readme``, put it into the
    documentation block ``block``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    print(text)
    if readme:
        replace_block(block, text)
