"""Cut a timm backbone into sequential stages (the local units' building blocks).

* :mod:`.split`: :func:`split_stages`, where the default cuts go and how ``num_stages`` changes them;
* :mod:`.graph`: the generic splitter, ``forward_features`` traced with torch.fx and cut after given modules;
* :mod:`.boundary`: what crosses a cut (:class:`Boundary`), detaching it, feature layouts and prefix tokens;
* :mod:`.adapters`: hand-written atom lists for plain-chain families, and :func:`register_stage_adapter`.
"""
from .adapters import register_stage_adapter, stage_atoms, supported_families
from .boundary import (
    Boundary,
    detach_stage_output,
    feature_layout,
    prefix_tokens,
    stage_feature,
    stage_tensors,
)
from .split import split_stages

__all__ = ['split_stages', 'register_stage_adapter', 'supported_families', 'stage_atoms', 'Boundary',
           'detach_stage_output', 'feature_layout', 'prefix_tokens', 'stage_feature', 'stage_tensors']
