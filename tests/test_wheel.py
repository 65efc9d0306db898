"""The wheel a user installs: built from a copy of the checkout, installed with its dependencies but no extras into a
fresh virtual environment (pip resolves them as a user's would; torch comes from this machine's disk), then used from
outside the checkout: the zoo, and a tiny train -> readout -> export without matplotlib, tensorboard, datasets or
webdataset."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('wheel')]  # one worker builds the environment, once
ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ('matplotlib', 'tensorboard', 'datasets', 'webdataset')
TAG = 'loco_resnet18_small.simclr_fmnist'


def _run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, (cmd, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope='module')
def fresh(tmp_path_factory):
    """(python, loco-timm command, environment) of a fresh virtual environment holding the wheel and its required
    dependencies only; removed afterwards (torch and its libraries take gigabytes)."""
    tmp = tmp_path_factory.mktemp('wheel')
    source = tmp / 'source'  # a copy: no stale build/ of the checkout can leak into the wheel
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns('.venv', '.git', 'runs', 'build', 'dist', '*.egg-info',
                                                                '__pycache__', '.pytest_cache', 'study'))
    _run([sys.executable, '-m', 'pip', 'wheel', source, '--no-deps', '--no-build-isolation', '-q', '-w', tmp / 'dist'])
    wheel, = (tmp / 'dist').glob('loco_timm-*.whl')
    venv = tmp / 'fresh'
    _run([sys.executable, '-m', 'venv', venv])
    # Python may cache the bytecode it compiles (as in a user's environment, whatever this one says): pip does not
    # byte-compile torch's thousands of modules (--no-compile), the first import compiles what is used, once
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'PYTHONDONTWRITEBYTECODE')}
    _run([venv / 'bin' / 'python', '-m', 'pip', 'install', '-q', '--disable-pip-version-check', '--no-compile', wheel],
         env=env)
    yield venv / 'bin' / 'python', venv / 'bin' / 'loco-timm', env
    shutil.rmtree(venv, ignore_errors=True)


def test_the_wheel_carries_the_hub_configs_and_no_extras(fresh, tmp_path):
    python, _, env = fresh
    code = ('import importlib.util, timm, loco_timm\n'
            'from loco_timm.models.tags import hub_config_dir, list_hub_configs\n'
            'print(loco_timm.__file__)\nprint(hub_config_dir())\n'
            'published = sorted(c.name for c in list_hub_configs() if c.published)\n'
            'print(sorted(timm.list_pretrained("loco_*")) == published)\n'
            'print(len(list_hub_configs()))\n'
            f'print(timm.create_model("{TAG}").pretrained_cfg["tag"])\n'
            f'print([m for m in {OPTIONAL!r} if importlib.util.find_spec(m)])\n')
    out = _run([python, '-c', code], cwd=tmp_path, env=env).stdout.split('\n')
    site = Path(out[0]).parent.parent
    assert out[0] == str(site / 'loco_timm' / '__init__.py') and 'fresh' in out[0], out
    assert out[1] == str(site / 'loco_timm' / 'hub_configs'), out
    assert out[2] == 'True' and int(out[3]) == len(list((ROOT / 'hub_configs').glob('*.yaml')))
    assert out[4] == 'simclr_fmnist' and out[5] == '[]', out


def test_without_extras_a_run_trains_reads_out_and_exports(fresh, tmp_path):
    _, command, env = fresh
    _run([command, 'train', '--config', TAG, '--out_dir', 'run', '--max_steps', '3', '--subset', '256',
          '--batch_size', '64'], cwd=tmp_path, env=env)
    read = _run([command, 'readout', 'run', '--config', TAG, '--train_subset', '512', '--test_subset', '256',
                 '--epochs', '2', '--references', 'false'], cwd=tmp_path, env=env)
    assert "(no readout.png: matplotlib is not installed (pip install 'loco-timm[plot]'))" in read.stdout
    _run([command, 'export', 'run', '--config', TAG, '--out', 'export'], cwd=tmp_path, env=env)
    files = sorted(p.name for p in (tmp_path / 'export').iterdir())
    assert files == sorted(['README.md', 'config.json', 'learner.safetensors', f'{TAG}.yaml', 'model.safetensors',
                            'readout.json'])
    assert 'readout.png' not in (tmp_path / 'export' / 'README.md').read_text()
    assert not (tmp_path / 'run' / 'loco').exists()  # no tensorboard tracker without tensorboard
