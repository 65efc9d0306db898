"""The documentation: the API reference covers the public API, and the README's links lead to pages that exist.
(`mkdocs build --strict` itself runs in the test command: a broken link, anchor or reference fails it.)"""
import re
from pathlib import Path

import loco_timm

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_reference_documents_every_public_name():
    documented = set(re.findall(r'^::: loco_timm\.(\w+)$', (ROOT / 'docs' / 'api.md').read_text(), re.M))
    errors = {name for name in loco_timm.__all__ if name in loco_timm.errors.__all__}  # documented as a module
    missing = [name for name in loco_timm.__all__ if name not in documented | errors | {'__version__'}]
    assert not missing, f'add ::: loco_timm.NAME to docs/api.md for {missing}'
    assert '::: loco_timm.errors' in (ROOT / 'docs' / 'api.md').read_text()


def test_every_page_is_in_the_navigation_and_every_readme_link_exists():
    nav = (ROOT / 'mkdocs.yml').read_text()
    pages = sorted(p.name for p in (ROOT / 'docs').glob('*.md'))
    assert pages and all(f': {page}' in nav for page in pages), pages
    readme = (ROOT / 'README.md').read_text()
    links = [link for link in re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', readme) if not link.startswith('http')]
    assert links and all((ROOT / link).is_file() for link in links), links
    assert len(readme.splitlines()) <= 250
