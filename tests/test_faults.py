"""Nothing lost to a damaged file: verified checkpoints, resume from the newest intact one, one-line errors with
exit 2 that name the file, pruning that keeps intact checkpoints, and plain permissions for atomically written files.
Real training runs, real files damaged in the ways disks and copies damage them. The finished run is the test run's
shared one (conftest.py: fmnist_run, trained through the command line once); tests copy it before they change it."""
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from shared_runs import PROCESSES, copy_run, in_process, shared_build
from zoo_common import FMNIST, TINY_READOUT, TINY_TRAIN, cli, cli_here, cli_outcome

from loco_timm.data.datasets import find_fashion_mnist
from loco_timm.files import plain_permissions, umask, write_text_atomic
from loco_timm.hub.export import export
from loco_timm.training.checkpoint import MANIFEST, _manifest, _prune, list_checkpoints, verify_checkpoint
from loco_timm.training.resume import trim_loss_log

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST not installed')]
TRAIN = ['--config', FMNIST, *TINY_TRAIN]  # the shared run's command: 6 steps, checkpoints at steps 3 and 6


def _truncate(path: Path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _flip_byte(path: Path, offset: int = -50) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def finished(fmnist_run):
    """A finished 6-step run (checkpoints at steps 3 and 6) trained by `loco-timm train TRAIN` and read out, kept
    pristine: tests copy it."""
    return fmnist_run


def _copy(run: Path, tmp_path: Path) -> Path:
    return copy_run(run, tmp_path)


def test_checkpoints_carry_a_manifest_that_verifies(finished):
    checkpoints = list_checkpoints(finished)
    assert [c.name for c in checkpoints] == ['step-00000003', 'step-00000006']
    for c in checkpoints:
        files = json.loads((c / MANIFEST).read_text())['files']
        assert {'learner.safetensors', 'progress.json'} <= set(files) and verify_checkpoint(c) is None


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'delete', 'manifest'])
def test_a_damaged_newest_checkpoint_is_named_by_readout_and_export(finished, tmp_path, damage):
    run = _copy(finished, tmp_path)
    newest = list_checkpoints(run)[-1]
    {'truncate': lambda: _truncate(newest / 'learner.safetensors'),
     'flip': lambda: _flip_byte(newest / 'learner.safetensors'),
     'delete': lambda: (newest / 'optimizer.bin').unlink(),
     'manifest': lambda: (newest / MANIFEST).write_text('{"files": ')}[damage]()
    assert verify_checkpoint(newest) is not None
    for args in (('readout', run, '--config', FMNIST, *TINY_READOUT),
                 ('export', run, '--config', FMNIST, '--out', tmp_path / 'export')):
        result = cli_outcome(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        line = result.stderr.strip()
        assert '\n' not in line and 'Traceback' not in line
        assert f'checkpoint {newest} is damaged' in line and 'intact checkpoints' in line and 'step-00000003' in line
    assert not (tmp_path / 'export').exists()


def test_resume_skips_a_damaged_checkpoint_and_ends_where_an_uninterrupted_run_ends(finished, tmp_path):
    run = _copy(finished, tmp_path)
    newest = list_checkpoints(run)[-1]
    _truncate(newest / 'learner.safetensors')
    result = cli_outcome('train', '--out-dir', run, *TRAIN, '--resume')
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'skipping damaged checkpoint {newest}: learner.safetensors has 100 bytes' in result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert 'resumed from' in output and 'step-00000003 at step 3' in output
    again, original = load_file(str(newest / 'learner.safetensors')), load_file(
        str(list_checkpoints(finished)[-1] / 'learner.safetensors'))
    assert verify_checkpoint(newest) is None and again.keys() == original.keys()
    for key in original:  # the same machine and thread count: bit for bit
        assert (again[key] == original[key]).all(), key


def test_no_intact_checkpoint_is_a_one_line_error_and_nothing_is_deleted(finished, tmp_path):
    run = _copy(finished, tmp_path)
    for c in list_checkpoints(run):
        _flip_byte(c / 'progress.json', 5)
    before = sorted(str(p.relative_to(run)) for p in run.rglob('*'))
    result = cli_outcome('train', '--out-dir', run, *TRAIN, '--resume')
    assert result.returncode == 2
    line = result.stderr.strip()
    assert '\n' not in line and 'no intact checkpoint in' in line and 'nothing was deleted' in line
    assert sorted(str(p.relative_to(run)) for p in run.rglob('*')) == before


def _fake_checkpoint(root: Path, step: int, intact: bool) -> Path:
    folder = root / 'checkpoints' / f'step-{step:08d}'
    folder.mkdir(parents=True)
    (folder / 'progress.json').write_text(json.dumps(dict(step=step)))
    (folder / 'learner.safetensors').write_bytes(b'x' * 64)
    (folder / MANIFEST).write_text(json.dumps(_manifest(folder)))
    if not intact:
        _truncate(folder / 'learner.safetensors', 10)
    return folder


def test_pruning_never_removes_the_newest_intact_checkpoints(tmp_path):
    old, good, damaged = (_fake_checkpoint(tmp_path, s, ok) for s, ok in ((1, True), (2, True), (3, False)))
    _prune(tmp_path, keep=2)  # two intact ones to keep: old and good; the damaged newer one stays for inspection
    assert list_checkpoints(tmp_path) == [old, good, damaged]
    _prune(tmp_path, keep=1)
    assert list_checkpoints(tmp_path) == [good, damaged]


def test_a_record_whose_write_fails_keeps_its_previous_content_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    record = tmp_path / 'results.json'
    write_text_atomic(record, '{"runs": [1]}')

    def full_disk(self, text):
        Path.write_bytes(self, text[:5].encode())  # part of it reaches the disk, then the write fails
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(Path, 'write_text', full_disk)
    with pytest.raises(OSError, match='No space left'):
        write_text_atomic(record, '{"runs": [1, 2]}')
    monkeypatch.undo()
    assert record.read_text() == '{"runs": [1]}' and [p.name for p in tmp_path.iterdir()] == ['results.json']


def test_atomically_written_files_get_the_permissions_a_plain_write_gives(finished, tmp_path):
    run = _copy(finished, tmp_path)
    cli_here('readout', run, '--config', FMNIST, *TINY_READOUT)  # written here: the copy's readout evaluates it
    with in_process():
        export(run, FMNIST, tmp_path / 'export', log=lambda *_: None)
    plain = 0o666 & ~umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / 'export').iterdir()}
    assert modes['model.safetensors'] == plain and set(modes.values()) == {plain}, modes
    secret = tmp_path / 'secret'
    secret.write_text('x')
    os.chmod(secret, 0o600)
    plain_permissions(secret)
    assert stat.S_IMODE(secret.stat().st_mode) == plain


def _popen(args, threads='1', **kwargs):
    env = {**os.environ, 'OMP_NUM_THREADS': threads, 'ACCELERATE_USE_CPU': '1', 'PYTHONUNBUFFERED': '1'}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def _cli_args(*args):
    return [sys.executable, '-m', 'loco_timm', *map(str, args)]


def _wait_for_step(run: Path, step: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    log = run / 'losses.jsonl'
    while time.time() < deadline:
        if log.is_file() and any(json.loads(line)['step'] >= step for line in log.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f'no step {step} logged in {timeout} s')


LONG = ['--config', FMNIST, '--subset', '64', '--batch-size', '16', '--max-steps', '40', '--checkpoint-every', '100',
        '--log-every', '1', '--trackers', 'none']


@pytest.fixture
def uninterrupted(tmp_path_factory):
    """The final weights of `loco-timm train LONG`, trained once per test run."""
    def build(run):
        result = cli('train', '--out-dir', run, *LONG, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    run = shared_build(tmp_path_factory, 'faults-uninterrupted', build)
    return load_file(str(list_checkpoints(run)[-1] / 'learner.safetensors'))


def _assert_same_weights(run: Path, expected: dict, steps: int = 40) -> None:
    final = load_file(str(list_checkpoints(run)[-1] / 'learner.safetensors'))
    assert list_checkpoints(run)[-1].name == f'step-{steps:08d}'
    for key in expected:
        assert (final[key] == expected[key]).all(), key


@pytest.mark.parametrize('signum', ['SIGTERM', 'SIGINT'])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_resume_ends_as_uninterrupted(tmp_path, request, signum):
    run = tmp_path / 'run'
    proc = _popen(_cli_args('train', '--out-dir', run, *LONG))
    _wait_for_step(run, 3, proc)
    os.kill(proc.pid, getattr(signal, signum))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f'loco-timm train: stopped by {signum} after step ') and 'continue with --resume' in last
    stopped = list_checkpoints(run)[-1]
    assert verify_checkpoint(stopped) is None and 3 <= int(stopped.name[5:]) < 40
    if signum == 'SIGINT':
        return  # the resume from a stop's checkpoint does not depend on the signal (SIGTERM checks it)
    result = cli('train', '--out-dir', run, *LONG, '--resume', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_weights(run, request.getfixturevalue('uninterrupted'))


@PROCESSES
def test_two_processes_stop_after_the_same_step_and_resume_mid_epoch_exactly(tmp_path):
    def launch(run, *extra):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        return _popen([sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                       '--num_machines', '1', '--main_process_ip', '127.0.0.1', '--main_process_port', str(port),
                       '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'loco_timm', 'train', '--out-dir',
                       str(run), *shorter, *extra])  # one thread per process on two cores

    shorter = [('16' if previous == '--max-steps' else a) for previous, a in zip([None] + LONG, LONG)]

    reference = launch(tmp_path / 'reference', '--checkpoint-every', '5', '--keep-checkpoints', '10')
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    expected = load_file(str(list_checkpoints(tmp_path / 'reference')[-1] / 'learner.safetensors'))
    # the reference as it was at its step-5 checkpoint (step 1 of its second epoch of 4 steps)
    run = tmp_path / 'run'
    shutil.copytree(tmp_path / 'reference', run)
    for c in list_checkpoints(run)[1:]:
        shutil.rmtree(c)
    trim_loss_log(run / 'losses.jsonl', 5)
    # resumed mid-epoch with two processes, then stopped as a cluster scheduler stops a job (SIGTERM to every
    # process), then resumed again: it ends where the uninterrupted run ends
    proc = launch(run, '--resume')
    _wait_for_step(run, 6, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert 'step-00000005 at step 5' in out, err[-3000:]
    # both ranks, the same step (their stderr lines may share a line)
    stops = re.findall(r'loco-timm train: stopped by SIGTERM after step (\d+) of', err)
    assert len(stops) == 2 and len(set(stops)) == 1, err[-3000:]
    assert 6 <= int(stops[0]) < 16 and verify_checkpoint(list_checkpoints(run)[-1]) is None
    resumed = launch(run, '--resume')
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    _assert_same_weights(run, expected, steps=16)


def test_a_second_trainer_on_a_folder_in_use_stops_and_a_killed_trainers_lock_is_taken_over(tmp_path):
    run = tmp_path / 'run'
    # no checkpoint before the kill, however fast the steps: the third trainer then starts afresh with LONG
    longer = [{'--max-steps': '400', '--checkpoint-every': '1000'}.get(previous, a)
              for previous, a in zip([None] + LONG, LONG)]
    first = _popen(_cli_args('train', '--out-dir', run, *longer))
    _wait_for_step(run, 2, first)
    second = cli_outcome('train', '--out-dir', run, *LONG, '--resume')
    assert second.returncode == 2
    line = second.stderr.strip()
    assert '\n' not in line and f'is in use by another trainer (process {first.pid} on ' in line
    os.killpg(first.pid, signal.SIGKILL)  # no chance to clean up: the lock file still names it
    first.communicate(timeout=60)
    assert json.loads((run / '.lock').read_text())['pid'] == first.pid
    third = cli_outcome('train', '--out-dir', run, *LONG, '--resume')
    assert third.returncode == 0, third.stderr[-3000:]
    assert f'took over the lock of process {first.pid}' in third.stdout + third.stderr
    assert (run / '.lock').read_text() == ''  # released


def test_the_same_command_on_the_same_machine_and_thread_count_gives_identical_results(finished, tmp_path):
    """What the README promises to reproduce: bit-identical weights and readout for the same command, machine and
    thread count (OMP_NUM_THREADS); nothing across machines or thread counts."""
    again = tmp_path / 'again'  # finished ran these two commands too (conftest.py), in a process of its own
    result = cli('train', '--out-dir', again, *TRAIN, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(list_checkpoints(finished), list_checkpoints(again), strict=True):
        assert (a / 'learner.safetensors').read_bytes() == (b / 'learner.safetensors').read_bytes()
    result = cli('readout', again, '--config', FMNIST, *TINY_READOUT)
    assert result.returncode == 0, result.stderr[-2000:]
    readouts = [json.loads((run / 'readout.json').read_text())['rows'] for run in (finished, again)]
    assert readouts[0] == readouts[1]


def test_damage_the_manifest_cannot_see_is_still_skipped_on_resume(finished, tmp_path):
    """A newest checkpoint without its manifest and with a truncated optimizer state (it cannot be verified by hash)
    fails to load, is skipped with one line, and the run resumes from the older one to the same end."""
    run = _copy(finished, tmp_path)
    newest = list_checkpoints(run)[-1]
    (newest / MANIFEST).unlink()
    _truncate(newest / 'optimizer.bin', 200)
    (run / 'losses.jsonl').write_text((run / 'losses.jsonl').read_text() + '{"step": 7, "loss/un')  # torn last row
    result = cli_outcome('train', '--out-dir', run, *TRAIN, '--resume')
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'skipping damaged checkpoint {newest}: it does not load' in result.stdout
    assert verify_checkpoint(newest) is None and (newest / MANIFEST).is_file()  # rewritten when step 6 came again
    original = load_file(str(list_checkpoints(finished)[-1] / 'learner.safetensors'))
    again = load_file(str(list_checkpoints(run)[-1] / 'learner.safetensors'))
    assert all((again[k] == original[k]).all() for k in original)


def test_a_checkpoint_missing_its_progress_file_is_named_not_passed_over(finished, tmp_path):
    run = _copy(finished, tmp_path)
    newest = list_checkpoints(run)[-1]
    (newest / 'progress.json').unlink()
    result = cli_outcome('readout', run, '--config', FMNIST, *TINY_READOUT)
    assert result.returncode == 2 and f'checkpoint {newest} is damaged: progress.json is missing' in result.stderr


def test_a_damaged_readout_head_is_named_by_export(finished, tmp_path):
    run = _copy(finished, tmp_path)
    cli_here('readout', run, '--config', FMNIST, *TINY_READOUT)  # written here: the copy's readout evaluates it
    _truncate(run / 'readout_head.safetensors', 20)
    result = cli_outcome('export', run, '--config', FMNIST, '--out', tmp_path / 'export')
    assert result.returncode == 2 and '\n' not in result.stderr.strip()
    assert 'readout_head.safetensors in' in result.stderr and 'run `loco-timm readout' in result.stderr
