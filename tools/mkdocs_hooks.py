"""MkDocs hook: the committed figures (``study/**/*.png``, ``benchmarks/results/**/*.png``) are served under
``figures/`` so the pages show them without a copy in ``docs/``."""
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ('study', 'benchmarks/results')


def on_files(files, config):
    """Add every committed PNG under the folders of ``FIGURES`` as ``figures/<its path>``."""
    for folder in FIGURES:
        for png in sorted((ROOT / folder).glob('**/*.png')):
            files.append(File.generated(config, f'figures/{png.relative_to(ROOT)}', abs_src_path=str(png)))
    return files
