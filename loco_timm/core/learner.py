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
from .gradients import (
    Schedule,
    backward_to,
    input_grads,
    output_grads,
    rng_state,
    set_rng_state,
    stashed_forward,
)
from .losses import NTXentLoss
from .sharing import SHARING, SoftSharing, sharing_units, soft_step, weight_units
from .stages import (
    detach_stage_output,
    feature_layout,
    split_stages,
    stage_feature,
    stage_tensors,
)
from .units import MODES, check_units, make_units

__all__ = ['LocalLearner', 'MODES', 'make_units']

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
    """

    def __init__(
            self,
            backbone: nn.Module | str,
            mode: str = 'loco',
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
        if isinstance(backbone, str):
            backbone = timm.create_model(backbone)
        self.encoder = backbone
        first_blocks = sharing_blocks if sharing == 'blocks' else 0
        self.input_size = tuple(input_size or self._default_input_size())
        self.__dict__['_stages'] = split_stages(backbone, num_stages, first_blocks=first_blocks,
                                                input_size=self.input_size)
        levels = num_stages = len(self.stages)
        if sharing == 'blocks':
            levels = (num_stages + 1) // 2
        self.units = (check_units(units, num_stages) if units is not None else
                      make_units(mode, num_stages, top_unit) if sharing == 'full' else
                      sharing_units(sharing, levels, top_unit))
        self.sharing = sharing
        self.config = dict(mode=mode, decoder=decoder, num_stages=levels, units=[list(u) for u in self.units],
                           top_unit=top_unit, temperature=temperature, proj_dim=proj_dim, hidden_dim=hidden_dim,
                           decoder_norm=decoder_norm, recompute=recompute, decoder_blocks=decoder_blocks,
                           mlp_layers=mlp_layers, sharing=sharing, sharing_blocks=sharing_blocks,
                           sharing_l2=sharing_l2)
        self.recompute = recompute
        self.stage_shapes = self._infer_stage_shapes()
        channels_last = getattr(backbone, 'output_fmt', 'NCHW') == 'NHWC'
        self.layouts = [feature_layout(shape, (getattr(stage, 'feature_info', None) or {}).get('num_chs'),
                                       channels_last) for shape, stage in zip(self.stage_shapes, self.stages)]
        token_pool = 'token' if getattr(backbone, 'global_pool', 'avg') == 'token' else 'avg'
        blocks = getattr(backbone, 'blocks', None)
        first_block = blocks[0] if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) else None
        heads = getattr(getattr(first_block, 'attn', None), 'num_heads', None)
        self.decoders = nn.ModuleList([
            create_decoder(decoder, self.stage_shapes[last], proj_dim, hidden_dim, decoder_norm, token_pool,
                           getattr(backbone, 'num_prefix_tokens', 0), heads, self.layouts[last], decoder_blocks,
                           mlp_layers)
            for _, last in self.units])
        self.loss = NTXentLoss(temperature)
        if sharing == 'l2':  # a copy of each stage that is the top of one unit and the bottom of another
            starts = {first for first, _ in self.units}
            shared = [last for first, last in self.units if last != first and last in starts]
            self.sharing_copies = SoftSharing(backbone, num_stages, shared, sharing_l2, self.input_size)

    @property
    def stages(self) -> nn.ModuleList:
        return self.__dict__['_stages']

    @property
    def mode(self) -> str:
        return self.config['mode']

    def _default_input_size(self) -> tuple[int, ...]:
        return resolve_model_data_config(self.encoder)['input_size']

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
        token_pool = 'token' if getattr(self.encoder, 'global_pool', 'avg') == 'token' else 'avg'
        prefix = getattr(self.encoder, 'num_prefix_tokens', 0)
        layouts = self.layouts[k] if isinstance(self.layouts[k], tuple) else (self.layouts[k],)
        tensors = feature if isinstance(feature, (tuple, list)) else (feature,)
        return torch.cat([Pool(token_pool, prefix, layout)(t) for layout, t in zip(layouts, tensors)], dim=1)

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
        return self.run_stages(torch.cat([view1, view2]), active, backward)[0].losses

    def run_stages(self, h, active: Sequence[int], backward: Callable[[torch.Tensor], None], start: int = 0,
                   stop: int | None = None, stash: bool = False) -> tuple[Schedule, object]:
        """:meth:`step`'s schedule over stages ``start..stop`` only (stage parallelism): ``h`` is stage ``start``'s
        input (both views' images, or the output of stage ``start - 1``). Runs the losses of the ``active`` units
        whose last stage is in range; an active unit ending above ``stop`` waits for :meth:`deliver`, one starting
        below ``start`` leaves its gradient at stage ``start``'s input (``state.grad[j]``, ``state.at[j] == start -
        1``). Returns the schedule and stage ``stop``'s output (default: up to the active units' last stage).

        ``stash`` (pipelined stage parallelism): stage ``stop`` runs with its weights stashed
        (:func:`~loco_timm.core.gradients.stashed_forward`) and keeps its graph until the units above deliver, even
        across an optimizer step: its weight gradient is then that of the weights of this forward."""
        spans = {j: self.units[j] for j in active}
        top = max(last for _, last in spans.values()) if stop is None else stop
        bottom = max(start, min(first for first, _ in spans.values()))
        batch = stage_tensors(h)[0].shape[0] // 2
        needs_input_grad = {k for first, last in spans.values() for k in range(first + 1, last + 1)}
        members = {k: [j for j, (first, last) in spans.items() if first <= k <= last] for k in range(top + 1)}
        every = dict(enumerate(self.units))  # who owns a stage's weights does not depend on which units run
        owners = weight_units(self.sharing, every, {k: [j for j, (f, l) in every.items() if f <= k <= l]
                                                    for k in range(top + 1)})
        state = Schedule(spans, members, owners)
        state.bottom = bottom
        state.keep = stop if stash else None
        for k in range(start, top + 1):
            if k < bottom or not members[k]:
                with torch.no_grad():
                    h = self.stages[k](h)
                continue
            state.inputs[k] = detach_stage_output(h, k in needs_input_grad)
            if self.recompute:
                state.rng[k] = rng_state(stage_tensors(h)[0].device)
            run = stashed_forward if k == state.keep else lambda stage, x: stage(x)
            h = state.outputs[k] = run(self.stages[k], state.inputs[k])
            for j in [j for j, (_, last) in spans.items() if last == k]:  # units whose loss sits on this stage
                original = self.feature(k, h)
                feature = detach_stage_output(original, True)
                z = self.decoders[j](feature)
                loss = self.loss(z[:batch], z[batch:])
                backward(loss)
                state.losses[j] = loss.detach()
                state.arrive(j, k, output_grads(h, original, feature))
                del feature, original, z, loss
            h = detach_stage_output(h)  # the graph stays referenced by state.outputs only, so freeing it there frees it
            self._carry_down(k, state)
        return state, h

    def deliver(self, state: Schedule, unit: int, stage: int, grad: list) -> None:
        """The gradient of ``unit``'s loss, computed on another process, at the output of ``stage`` (the top of
        :meth:`run_stages`' range): carried down like a local one."""
        state.remote.add(unit)
        state.arrive(unit, stage, grad)
        self._carry_down(stage, state)

    def _carry_down(self, k: int, state: Schedule) -> None:
        for m in range(k, state.bottom - 1, -1):  # carry gradients down and free every stage no later unit needs
            if m in state.outputs:
                self._advance_stage(m, state)

    def _advance_stage(self, m: int, state: Schedule) -> None:
        """Move the gradients that reached stage m's output on: each unit that continues below gets its own
        input-gradient pass; once every unit containing stage m has delivered, one weight-gradient pass with their
        summed gradient, and the stage's graph is freed."""
        arrived = [j for j in state.members[m] if state.ended(j) and state.at[j] == m]
        waiting = [j for j in state.members[m] if not state.ended(j)]
        if state.outputs[m] is None:  # dropped by recompute
            if not arrived:
                return
            state.outputs[m] = self._recompute_stage(m, state)
        outs, inputs = stage_tensors(state.outputs[m]), stage_tensors(state.inputs[m])
        if not any(t.requires_grad for t in outs):  # nothing in this stage learns and no gradient passes through it
            for j in arrived:  # no unit continues below a stage whose input needs no gradient
                state.grad.pop(j)
                state.at[j] = m - 1
            if not waiting:
                del state.outputs[m], state.inputs[m]
            return
        params = [p for p in self.stages[m].parameters() if p.requires_grad]
        leaves = [t for t in inputs if t.requires_grad]
        continuing = [j for j in arrived if state.spans[j][0] < m]
        single = len(state.members[m]) == 1 and continuing and continuing[0] in state.weights[m]
        if not waiting and single:  # one unit, which trains the stage: weights and input in one pass
            backward_to(outs, state.total.pop(m), params + leaves)
            state.arrive(continuing[0], m - 1, [t.grad if t.requires_grad else None for t in inputs])
            del state.outputs[m], state.inputs[m]
            return
        for j in arrived:
            if j in continuing:
                state.arrive(j, m - 1, input_grads(outs, state.grad.pop(j), inputs))
            else:
                state.grad.pop(j)
                state.at[j] = m - 1
        if not waiting:
            total = state.total.pop(m)
            if params:
                backward_to(outs, total, params)
            del state.outputs[m], state.inputs[m]
        elif self.recompute and m != state.keep:  # a higher unit still needs this stage: keep its input only
            state.outputs[m] = None

    def _recompute_stage(self, m: int, state: Schedule) -> torch.Tensor:
        """Stage m's forward again, on its kept input with its first forward's random state; its buffers
        (BatchNorm running statistics) are restored afterwards, so they are updated once per step."""
        stage, inp = self.stages[m], state.inputs[m]
        device = stage_tensors(inp)[0].device
        # the forward updates copies of the buffers (its graph may keep them), then the originals are put back
        owners = stage.buffer_owners() if hasattr(stage, 'buffer_owners') else [
            (module, name) for module in stage.modules() for name in module._buffers]
        originals = {(id(module), name): (module, name, module._buffers[name]) for module, name in owners
                     if module._buffers.get(name) is not None}
        for module, name, buf in originals.values():
            module._buffers[name] = buf.clone()
        devices = [device] if device.type == 'cuda' else []
        try:
            with torch.random.fork_rng(devices=devices):
                set_rng_state(state.rng[m], device)
                out = stage(inp)
        finally:
            for module, name, buf in originals.values():
                module._buffers[name] = buf
        return out

    def summary(self) -> list[dict]:
        """Per unit: its stages, the decoder's input shape and layout, kind, parameter count and forward FLOPs per image."""
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
