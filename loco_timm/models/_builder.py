"""What every loco-timm architecture module shares: pretrained configs from the hub configs and model creation
with a clear error where the Hub lacks the weights."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from huggingface_hub import file_exists, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors.torch import load_file
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._builder import resolve_pretrained_cfg
from torch import nn

from ..errors import PretrainedWeightsNotFound
from ..files import file_digest
from .tags import list_hub_configs

__all__ = ['loco_default_cfgs', 'tag_cfgs', 'create']

COMMON_CFG = {'url': '', 'interpolation': 'bilinear', 'license': 'apache-2.0', 'paper_ids': 'arxiv:2008.01342'}


def loco_default_cfgs(architectures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """timm's ``generate_default_cfgs`` of :func:`tag_cfgs`, each architecture's LoCo tag kept as its default (timm
    would make the first tag with published weights the default, which is another method's weights while only they
    are published)."""
    cfgs = generate_default_cfgs(tag_cfgs(architectures))
    modes = {hub.name: hub.mode for hub in list_hub_configs()}
    for name, default in cfgs.items():
        loco = [tag for tag in default.tags if modes.get(f'{name}.{tag}') == 'loco']
        if loco and default.tags[0] != loco[0]:
            default.tags.remove(loco[0])
            default.tags.appendleft(loco[0])
    return cfgs


def tag_cfgs(architectures: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``generate_default_cfgs`` input for ``architectures`` (name -> architecture facts of its pretrained config):
    one entry per weight tag of ``hub_configs/`` (the LoCo tag first, so the untagged name resolves to it), and an
    ``.untrained`` entry for an architecture without tags."""
    cfgs = {}
    for hub_config in list_hub_configs():  # tags of other timm architectures are export-only (hf-hub: loading)
        if hub_config.architecture in architectures:
            cfgs[hub_config.name] = {**COMMON_CFG, **architectures[hub_config.architecture],
                                     **hub_config.pretrained_cfg()}
    for architecture, facts in architectures.items():
        if not any(name.startswith(architecture + '.') for name in cfgs):
            cfgs[f'{architecture}.untrained'] = {**COMMON_CFG, **facts}
    return cfgs


def _hub_id(variant: str, cfg) -> str | None:
    """Where a tag's weights are: its pretrained config's ``hf_hub_id`` (published tags), else the repository its hub
    config names (an unpublished tag may be on a mirror at ``HF_ENDPOINT``)."""
    if cfg.hf_hub_id:
        return cfg.hf_hub_id
    hub = {c.name: c for c in list_hub_configs()}.get(f'{variant}.{cfg.tag}')
    return hub.hf_hub_id if hub is not None else None


def _missing_weights_message(variant: str, kwargs: dict, err: Exception) -> str:
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    tag, hub_id = cfg.tag, _hub_id(variant, cfg) or '(no hf_hub_id)'
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f'no pretrained weights for {variant}.{tag} at {hub_id} on {endpoint} ({type(err).__name__}: {reason}). '
            f'They may not be published: train them (`loco-timm train --config {variant}.{tag}`), export '
            f'(`loco-timm export RUN --config {variant}.{tag} --out DIR`) and publish (`loco-timm publish DIR '
            f'--repo-id {hub_id.split("@")[0]}`), or set HF_ENDPOINT to a mirror that has them; '
            f'pretrained=False builds the model untrained')


def _damaged(path: str) -> str | None:
    """Why a cached Hub file is damaged, or None: its bytes against the hash its cache blob is named by (sha256 for
    LFS files, git's blob sha1 otherwise), then a full safetensors read."""
    blob = Path(os.path.realpath(path))
    data_hash = hashlib.sha256() if len(blob.name) == 64 else hashlib.sha1(f'blob {blob.stat().st_size}\0'.encode())
    if len(blob.name) in (40, 64) and file_digest(blob, data_hash) != blob.name:
        return f'its {blob.stat().st_size} bytes do not hash to the {blob.name[:12]}... the cache names it by'
    try:
        load_file(str(blob))
    except Exception as err:  # noqa: BLE001 - any read failure means damaged
        return f'{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ""}'
    return None


def _offers_pickle(repo: str, revision: str | None) -> bool:
    try:
        return any(file_exists(repo, name, revision=revision) for name in ('pytorch_model.bin', 'model.pt'))
    except Exception:  # noqa: BLE001 - offline or unreachable: nothing to say about it
        return False


def _hub_weights(variant: str, repo_id: str) -> str:
    """The verified local path of ``model.safetensors`` of ``repo_id`` (``REPO`` or ``REPO@REVISION``), downloaded
    or from the cache; pickled weights are never fetched.

    Raises:
        PretrainedWeightsNotFound: The cached file is damaged, or the repository offers only pickled weights.
    """
    repo, _, revision = repo_id.partition('@')
    try:
        path = hf_hub_download(repo, 'model.safetensors', revision=revision or None)
    except (EntryNotFoundError, RepositoryNotFoundError):  # some mirrors answer a missing file as a missing repo
        if _offers_pickle(repo, revision or None):
            raise PretrainedWeightsNotFound(
                f'{repo} offers only pickled weights (pytorch_model.bin) for {variant}, which loco-timm does not load '
                f'(unpickling can run code from the file): publish model.safetensors (`loco-timm export`, then '
                f'`loco-timm publish`)') from None
        raise
    reason = _damaged(path)
    if reason is not None:
        raise PretrainedWeightsNotFound(
            f'the cached weights of {variant} at {path} are damaged ({reason}): fetch them again with `hf download '
            f'{repo} model.safetensors --force-download` (or delete {os.path.realpath(path)}), then load again')
    return path


def create(model_cls: type, variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.models.build_model_with_cfg``, with :class:`PretrainedWeightsNotFound` where the weights are missing,
    damaged in the Hugging Face cache, or offered only as pickles. Hub weights are fetched and verified here and
    handed to timm as a local file."""
    try:
        if pretrained:
            overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
            cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                         pretrained_cfg_overlay=overlay)
            hub_id = _hub_id(variant, cfg)
            if hub_id and not (cfg.file or cfg.state_dict):
                kwargs['pretrained_cfg_overlay'] = dict(overlay, file=_hub_weights(variant, hub_id))
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError, LocalEntryNotFoundError, ConnectionError) as err:
        raise PretrainedWeightsNotFound(_missing_weights_message(variant, kwargs, err)) from None
