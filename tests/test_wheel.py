"""A wheel install carries the hub configs: build the wheel, install it into a fresh environment and use the zoo
from outside the checkout."""
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, (cmd, result.stdout[-2000:], result.stderr[-3000:])
    return result


def test_wheel_installs_the_package_with_its_hub_configs(tmp_path):
    source = tmp_path / 'source'  # a copy: no stale build/ of the checkout can leak into the wheel
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns('.venv', '.git', 'runs', 'build', 'dist', '*.egg-info',
                                                                '__pycache__', '.pytest_cache'))
    _run([sys.executable, '-m', 'pip', 'wheel', source, '--no-deps', '--no-build-isolation', '-q', '-w',
          tmp_path / 'dist'])
    wheel, = (tmp_path / 'dist').glob('loco_timm-*.whl')
    fresh = tmp_path / 'fresh'
    _run([sys.executable, '-m', 'venv', '--without-pip', fresh])
    python = fresh / 'bin' / 'python'
    _run([sys.executable, '-m', 'pip', '--python', python, 'install', '--no-deps', '--no-index', '-q', wheel])
    # dependencies (torch, timm ...) come from this environment; loco_timm only from the wheel
    fresh_site = Path(_run([python, '-c', 'import site; print(site.getsitepackages()[0])']).stdout.strip())
    (fresh_site / 'deps.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    code = ('import timm, loco_timm\n'
            'from loco_timm.models.tags import hub_config_dir, list_hub_configs\n'
            'print(loco_timm.__file__)\nprint(hub_config_dir())\n'
            'print(sorted(timm.list_pretrained("loco_*")) == sorted(c.name for c in list_hub_configs()))\n'
            'print(len(list_hub_configs()))\n'
            'm = timm.create_model("loco_resnet18_small.simclr_fmnist")\nprint(m.pretrained_cfg["hf_hub_id"])\n')
    out = _run([python, '-c', code], cwd=tmp_path, env=env).stdout.split('\n')
    assert out[0].startswith(str(fresh_site / 'loco_timm')), out
    assert out[1] == str(fresh_site / 'loco_timm' / 'hub_configs'), out
    assert out[2] == 'True' and int(out[3]) == len(list((ROOT / 'hub_configs').glob('*.yaml')))
    assert out[4] == 'loco-timm/loco_resnet18_small.simclr_fmnist'
    help_text = _run([fresh / 'bin' / 'loco-timm', 'export', '--help'], cwd=tmp_path, env=env).stdout
    assert '--config' in help_text
