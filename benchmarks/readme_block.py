"""Generated README blocks: text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` is rewritten by the
benchmark that produces it, so README tables are never typed by hand."""
from __future__ import annotations

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
