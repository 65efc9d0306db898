"""Publishing exported repositories to the Hugging Face Hub: ``loco-timm publish``.

:func:`publish` checks the folder (an export: ``model.safetensors``, ``config.json``, ``README.md``; no pickled
weights), the repository id and the token before anything leaves the machine, then creates the repository if needed
and uploads the folder with ``huggingface_hub.HfApi.upload_folder``. Publishing the same folder again is a no-op on the
Hub (unchanged files are skipped, so no empty commit is made).
"""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import ConfigError, MissingFileError, PublishError

__all__ = ['publish', 'check_export_folder', 'PICKLE_SUFFIXES']

PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt')
REQUIRED = ('model.safetensors', 'config.json', 'README.md')


def check_export_folder(folder: str | Path) -> Path:
    """The folder, if it is a loco-timm export that is safe to publish; else a one-line error naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f'{folder} is not a folder: give the --out folder of `loco-timm export`')
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise MissingFileError(f'{folder} lacks {", ".join(missing)}: publish the folder written by `loco-timm export`')
    pickled = sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ConfigError(f'{folder} holds pickled files ({", ".join(pickled)}): loco-timm publishes safetensors only; '
                         f'remove them')
    return folder


def publish(folder: str | Path, repo_id: str, *, token: str | None = None, revision: str | None = None,
            private: bool = False, commit_message: str | None = None, log=print) -> str:
    """Upload an export folder to the Hub repository ``repo_id`` (created if missing); returns the commit URL.

    Args:
        folder: the ``--out`` folder of ``loco-timm export``.
        repo_id: ``ORG/NAME`` (validated).
        token: a Hub token with write access (default: ``HF_TOKEN`` or the one saved by ``hf auth login``).
        revision: the branch to commit to (default: main).
        private: create the repository as private.
        commit_message: default ``Upload <tag> (loco-timm export)``.
    """
    folder = check_export_folder(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f'invalid repo id {repo_id!r}: {err}') from None
    if '/' not in repo_id:
        raise ConfigError(f'repo id {repo_id!r} needs an owner: use ORG/NAME')
    token = token or huggingface_hub.get_token()
    if not token:
        raise PublishError('no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token (it needs '
                           'write access to ' + repo_id + ')')
    api = huggingface_hub.HfApi(token=token, library_name='loco-timm')
    pretrained_cfg = json.loads((folder / 'config.json').read_text()).get('pretrained_cfg', {})
    tag = f'{pretrained_cfg.get("architecture", folder.name)}.{pretrained_cfg.get("tag", "")}'.rstrip('.')
    try:
        api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message or f'Upload {tag} (loco-timm export)',
                                 ignore_patterns=[f'*{s}' for s in PICKLE_SUFFIXES] + ['.*'])
    except Exception as err:  # network, authentication and Hub errors all end the same way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        endpoint = huggingface_hub.constants.ENDPOINT
        raise PublishError(f'upload of {folder} to {repo_id} on {endpoint} failed ({type(err).__name__}: {reason}); '
                           f'check the network, HF_ENDPOINT and that the token can write to {repo_id}') from None
    url = str(getattr(info, 'commit_url', info))
    log(f'published {folder} to {repo_id}: {url}')
    return url
