"""LocalLearner: end-to-end SimCLR, Greedy InfoMax and LoCo on any timm backbone.

LoCo (Xiong, Ren & Urtasun, NeurIPS 2020, arXiv:2008.01342) trains a network cut into stages S_0..S_{K-1} with
*overlapping* local units: unit k = {S_k, S_k+1}, its NT-Xent loss on the output of S_k+1, the input of S_k
detached. Each middle stage is shared by two units and gets gradient from both losses. Greedy InfoMax (GIM) uses
one unit per stage; end-to-end SimCLR (E2E) one unit over all stages.

``LocalLearner.step`` runs each stage's forward once and schedules the local backward passes unit by unit:

* every stage runs on a detached copy of its input, so each stage's graph is separate;
* as soon as a unit's top stage has run, the unit's loss is computed and backpropagated through its decoder (through
  the ``backward`` callable, where a trainer applies loss scaling) to the unit's top stage output;
* the gradient then moves down the unit's stages right away. A stage that a higher unit still needs gets an
  input-gradient-only pass for the lower unit (its graph kept); once every unit containing a stage has delivered, the
  stage gets **one** weight-gradient pass with the summed output gradient and its graph is freed. Where only one
  unit contains a stage, weights and input share one pass (E2E is plain backprop).

A stage's graph therefore lives only until the last unit containing it has its loss: peak activation memory is
about the largest unit plus its decoder (GIM: one stage, LoCo: two), not the whole network, and a loss never
reaches a stage outside its unit. Tests compare the gradients with autograd references and measure the saved bytes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import timm
import torch
import torch.distributed as dist
from timm.data import resolve_model_data_config
from torch import nn

from .decoders import DECODERS, NORMS, Pool, count_flops, create_decoder
from .losses import NTXentLoss
from .schedule import run_stages
from .sharing import SHARING, SoftSharing, sharing_units, soft_step
from .stages import (
    feature_layout,
    prefix_tokens,
    split_stages,
    stage_feature,
)
from .units import MODES, check_units, make_units

__all__ = ['LocalLearner', 'MODES', 'make_units']

def _check_settings(mode: str, decoder: str | None, decoder_norm: str, units, recompute: bool, sharing: str) -> str:
    """Refuse settings that do not go together; returns the decoder (conv for gim/loco, mlp for e2e by default)."""
    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}: use one of {", ".join(MODES)}')
    if sharing not in SHARING:
        raise ValueError(f'unknown sharing {sharing!r}: use one of {", ".join(SHARING)}')
    if sharing != 'full' and (mode != 'loco' or units is not None):
        raise ValueError(f'sharing={sharing!r} changes how LoCo\'s overlapping units share stages: use it with '
                         f'mode="loco" and without custom units')
    if sharing == 'l2' and recompute:
        raise ValueError('sharing="l2" runs each unit on its own copy: recompute does not apply, set it False')
    decoder = decoder or ('mlp' if mode == 'e2e' else 'conv')
    if decoder not in DECODERS:
        raise ValueError(f'unknown decoder {decoder!r}: use one of {", ".join(DECODERS)}')
    if decoder_norm not in NORMS:
        raise ValueError(f'unknown decoder_norm {decoder_norm!r}: use one of {", ".join(NORMS)}')
    return decoder


class LocalLearner(nn.Module):
    """A timm backbone cut into stages, with one decoder and NT-Xent loss per local unit.

    Args:
        backbone: A timm model (or a timm model name, created without pretrained weights).
        mode: ``"loco"``, ``"gim"`` or ``"e2e"``.
        decoder: ``"conv"`` or ``"mlp"`` (see :mod:`loco_timm.core.decoders`); None: conv for gim/loco, mlp for e2e.
        num_stages: Number of stages K (see :func:`loco_timm.split_stages`); None: the model's default.
        units: Custom units, a list of inclusive ``(first, last)`` stage indices (overrides ``mode``'s units).
        top_unit: LoCo: add a unit on the last stage alone.
        temperature: NT-Xent temperature.
        proj_dim: Embedding width of every decoder.
        hidden_dim: Decoder MLP hidden width (default: the input width).
        decoder_norm: Normalisation in the decoders: ``"batch"`` (paper), ``"layer"`` or ``"none"``.
        input_size: (C, H, W) used once to infer the stage output shapes (default: the model's data config).
        recompute: Do not keep a stage's graph while a higher unit runs: keep its input and run its forward again
            when its gradients are due (activation checkpointing of the lower stage of a unit). Gradients, weights
            and BatchNorm statistics are those of the plain schedule (buffers are restored after the second forward,
            random state replayed); it costs one more forward of each such stage.
        decoder_blocks: Conv (token) blocks in every decoder before its pooling, overriding ``decoder``'s (conv: 1,
            mlp: 0); the paper's decoder-depth ablation.
        mlp_layers: Linear layers of every decoder's projection MLP (2; the paper's "+ 2-layer MLP": 4).
        sharing: LoCo only: how overlapping units share a stage, ``"full"`` (LoCo), ``"none"``, ``"upper"``,
            ``"blocks"`` or ``"l2"`` (see :mod:`loco_timm.core.sharing`).
        sharing_blocks: ``"blocks"``: how many first blocks of the next stage a unit includes.
        sharing_l2: ``"l2"``: the penalty coefficient.

    Attributes:
        encoder: The backbone itself (same parameter objects), for readout and export.
        stages: The K stages (not registered as submodules: their parameters are the encoder's).
        units: List of ``(first, last)`` stage indices per unit.
        decoders: One decoder per unit.
        stage_shapes: Per-image output shape of every stage for ``input_size``.
        layouts: Every stage feature's layout (``NCHW``, ``NHWC``, ``NLC``, ``NC``; a tuple for several tensors).
        prefix_tokens: Every stage feature's class/register tokens, found from its token count (0 for maps).
    """

    def __init__(
            self,
            backbone: nn.Module | str,
            mode: str = 'loco',
            *,
            decoder: str | None = None,
            num_stages: int | None = None,
            units: Sequence[Sequence[int]] | None = None,
            top_unit: bool = False,
            temperature: float = 0.1,
            proj_dim: int = 128,
            hidden_dim: int | None = None,
            decoder_norm: str = 'batch',
            input_size: Sequence[int] | None = None,
            recompute: bool = False,
            decoder_blocks: int | None = None,
            mlp_layers: int = 2,
            sharing: str = 'full',
            sharing_blocks: int = 1,
            sharing_l2: float = 1e-3,
    ):
        super().__init__()
        decoder = _check_settings(mode, decoder, decoder_norm, units, recompute, sharing)
        self.encoder = timm.create_model(backbone) if isinstance(backbone, str) else backbone
        self.input_size = tuple(input_size or resolve_model_data_config(self.encoder)['input_size'])
        self.__dict__['_stages'] = split_stages(self.encoder, num_stages, input_size=self.input_size,
                                                first_blocks=sharing_blocks if sharing == 'blocks' else 0)
        num_stages = len(self.stages)
        levels = (num_stages + 1) // 2 if sharing == 'blocks' else num_stages
        self.units = (check_units(units, num_stages) if units is not None else
                      make_units(mode, num_stages, top_unit) if sharing == 'full' else
                      sharing_units(sharing, levels, top_unit))
        self.sharing, self.recompute = sharing, recompute
        self.config = dict(mode=mode, decoder=decoder, num_stages=levels, units=[list(u) for u in self.units],
                           top_unit=top_unit, temperature=temperature, proj_dim=proj_dim, hidden_dim=hidden_dim,
                           decoder_norm=decoder_norm, recompute=recompute, decoder_blocks=decoder_blocks,
                           mlp_layers=mlp_layers, sharing=sharing, sharing_blocks=sharing_blocks,
                           sharing_l2=sharing_l2)
        self._read_stage_features()
        self.decoders = nn.ModuleList([
            create_decoder(decoder, self.stage_shapes[last], proj_dim=proj_dim, hidden_dim=hidden_dim,
                           norm=decoder_norm, token_pool=self.token_pool, num_prefix_tokens=self.prefix_tokens[last],
                           layout=self.layouts[last], blocks=decoder_blocks, mlp_layers=mlp_layers)
            for _, last in self.units])
        self.loss = NTXentLoss(temperature)
        if sharing == 'l2':  # a copy of each stage that is the top of one unit and the bottom of another
            starts = {first for first, _ in self.units}
            shared = [last for first, last in self.units if last != first and last in starts]
            self.sharing_copies = SoftSharing(self.encoder, num_stages, shared, sharing_l2, self.input_size)

    @property
    def stages(self) -> nn.ModuleList:
        return self.__dict__['_stages']

    @property
    def mode(self) -> str:
        return self.config['mode']

    def _read_stage_features(self) -> None:
        """What each stage's feature is, read from one forward at ``input_size``: its per-image shape, layout and
        prefix tokens (what its decoders and pooling follow), and the head's pooling (the last stage's readout is
        the model's own ``forward_head(x, pre_logits=True)``)."""
        self.stage_shapes = self._infer_stage_shapes()
        channels_last = getattr(self.encoder, 'output_fmt', 'NCHW') == 'NHWC'
        self.layouts = [feature_layout(shape, (getattr(stage, 'feature_info', None) or {}).get('num_chs'),
                                       channels_last) for shape, stage in zip(self.stage_shapes, self.stages)]
        self.prefix_tokens = [self._prefix_tokens(k) for k in range(len(self.stages))]
        self.token_pool = 'token' if getattr(self.encoder, 'global_pool', 'avg') == 'token' else 'avg'

    def _prefix_tokens(self, k: int) -> int | tuple[int, ...]:
        """Class/register tokens of stage ``k``'s token feature(s), found from their token counts."""
        reduction = (getattr(self.stages[k], 'feature_info', None) or {}).get('reduction')
        shape, layout = self.stage_shapes[k], self.layouts[k]
        if isinstance(layout, tuple):
            return tuple(prefix_tokens(s[0], self.input_size, reduction) if lay == 'NLC' else 0
                         for s, lay in zip(shape, layout))
        return prefix_tokens(shape[0], self.input_size, reduction) if layout == 'NLC' else 0

    @torch.no_grad()
    def _infer_stage_shapes(self) -> list[tuple[int, ...]]:
        flags = {m: m.training for m in self.encoder.modules()}
        self.encoder.eval()
        try:
            param = next(self.encoder.parameters())
            h = torch.zeros(2, *self.input_size, device=param.device, dtype=param.dtype)
            shapes, self._feature_parts = [], []
            for stage in self.stages:
                h = stage(h)
                f = stage_feature(h)
                if isinstance(f, torch.Tensor):
                    shapes.append(tuple(f.shape[1:]))
                    self._feature_parts.append(None)
                    continue
                # a level of several tensors: decode those with one row per image (not TNT's pixel tokens,
                # one row per patch)
                parts = tuple(i for i, t in enumerate(f) if t.shape[0] == 2)
                shapes.append(tuple(tuple(f[i].shape[1:]) for i in parts) if len(parts) > 1 else
                              tuple(f[parts[0]].shape[1:]))
                self._feature_parts.append(parts)
        finally:
            for m, flag in flags.items():
                m.training = flag
        return shapes

    def feature(self, k: int, output):
        """The part of stage ``k``'s output its decoders read: the level's feature (one tensor, or the tensors of
        a level of several that have one row per image)."""
        f = stage_feature(output)
        parts = self._feature_parts[k]
        if parts is None:
            return f
        return tuple(f[i] for i in parts) if len(parts) > 1 else f[parts[0]]

    def forward(self, x: torch.Tensor) -> list:
        """The feature of every stage for a batch of images (the last equals ``encoder.forward_features(x)``)."""
        outputs = []
        for k, stage in enumerate(self.stages):
            x = stage(x)
            outputs.append(self.feature(k, x) if k < len(self.stages) - 1 else x)
        return outputs

    def pool(self, k: int, feature) -> torch.Tensor:
        """Stage ``k``'s feature pooled to one vector per image (as its decoders pool it, without their block)."""
        layouts = self.layouts[k] if isinstance(self.layouts[k], tuple) else (self.layouts[k],)
        prefixes = self.prefix_tokens[k] if isinstance(self.prefix_tokens[k], tuple) else (self.prefix_tokens[k],)
        tensors = feature if isinstance(feature, (tuple, list)) else (feature,)
        return torch.cat([Pool(self.token_pool, prefix, layout)(t) for layout, prefix, t in
                          zip(layouts, prefixes, tensors)], dim=1)

    def _check_step_args(self, view1: torch.Tensor, view2: torch.Tensor, units: Sequence[int] | None) -> list[int]:
        if not isinstance(view1, torch.Tensor) or not isinstance(view2, torch.Tensor):
            raise ValueError('view1 and view2 must be tensors of shape (B, C, H, W)')
        if view1.shape != view2.shape:
            raise ValueError(f'the two views must have the same shape, got {tuple(view1.shape)} and '
                             f'{tuple(view2.shape)}: crop both views to the same size')
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if view1.ndim == 0 or view1.shape[0] * world < 2:
            raise ValueError(f'a batch of {view1.shape[0] if view1.ndim else 0} image(s) has no negatives for the '
                             f'contrastive loss: use a batch of at least 2 images')
        if units is None:
            return list(range(len(self.units)))
        active = sorted(set(units))
        if not active or any(not isinstance(j, int) or not 0 <= j < len(self.units) for j in active):
            raise ValueError(f'units={list(units)!r} must be indices into learner.units (0..{len(self.units) - 1})')
        return active

    def step(
            self,
            view1: torch.Tensor,
            view2: torch.Tensor,
            units: Sequence[int] | None = None,
            backward: Callable[[torch.Tensor], None] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Forward pass and every local backward pass for one batch of two views.

        Gradients accumulate into ``.grad`` (zero them between steps). Works under ``torch.autocast``.

        Args:
            view1: First views, (B, C, H, W).
            view2: Second views, same shape, same images in the same order.
            units: Indices into ``self.units`` whose losses contribute (default: all).
            backward: Called once per unit with its scalar loss, e.g. ``accelerator.backward``
                (default: ``loss.backward()``). It backpropagates through the unit's decoder; the learner then
                carries the gradient through the unit's stages.

        Returns:
            ``{unit index: detached loss}`` for the active units.
        """
        active = self._check_step_args(view1, view2, units)
        backward = backward or (lambda loss: loss.backward())
        if self.sharing == 'l2':
            return soft_step(self, view1, view2, active, backward)
        return run_stages(self, torch.cat([view1, view2]), active, backward)[0].losses

    def summary(self) -> list[dict]:
        """Per unit: its stages, the decoder's input shape and layout, kind, parameter count and forward FLOPs per
        image."""
        rows = []
        for (first, last), dec in zip(self.units, self.decoders):
            param = next(dec.parameters())
            shape = self.stage_shapes[last]
            multi = bool(shape) and isinstance(shape[0], tuple)
            example = (tuple(torch.zeros(1, *s, device=param.device, dtype=param.dtype) for s in shape) if multi
                       else torch.zeros(1, *shape, device=param.device, dtype=param.dtype))
            rows.append(dict(unit=(first, last), input_shape=shape, layout=self.layouts[last],
                             decoder=self.config['decoder'],
                             params=sum(p.numel() for p in dec.parameters()), flops=count_flops(dec, example)))
        return rows
