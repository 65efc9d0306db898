"""What every loco-timm architecture module shares: pretrained configs from the hub configs and model creation
with a clear error where the Hub lacks the weights."""
from __future__ import annotations

import os
from typing import Any

from timm.models import build_model_with_cfg
from torch import nn

from ..tags import list_hub_configs

__all__ = ['PretrainedWeightsNotFound', 'tag_cfgs', 'create']

COMMON_CFG = {'url': '', 'interpolation': 'bilinear', 'license': 'apache-2.0', 'paper_ids': 'arxiv:2008.01342'}


class PretrainedWeightsNotFound(RuntimeError):
    """``pretrained=True`` on a tag whose weights the Hub (or the mirror at ``HF_ENDPOINT``) does not have."""


PretrainedWeightsNotFound.__module__ = 'loco_timm.zoo'  # its public home


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


def _missing_weights_message(variant: str, kwargs: dict, err: Exception) -> str:
    from timm.models._builder import resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    tag, hub_id = cfg.tag, cfg.hf_hub_id or '(no hf_hub_id)'
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f'no pretrained weights for {variant}.{tag} at {hub_id} on {endpoint} ({type(err).__name__}: {reason}). '
            f'They may not be published: train them (`loco-timm train --config {variant}.{tag}`), export '
            f'(`loco-timm export RUN --config {variant}.{tag} --out DIR`) and publish (`loco-timm publish DIR '
            f'--repo-id {hub_id.split("@")[0]}`), or set HF_ENDPOINT to a mirror that has them; '
            f'pretrained=False builds the model untrained')


def create(model_cls: type, variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.models.build_model_with_cfg``, with :class:`PretrainedWeightsNotFound` where the weights are missing."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError, LocalEntryNotFoundError, ConnectionError) as err:
        raise PretrainedWeightsNotFound(_missing_weights_message(variant, kwargs, err)) from None
