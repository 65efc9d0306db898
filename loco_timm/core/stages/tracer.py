"""The tracers behind the generic splitter: timm's FX set-up, and a fallback that decides shape checks.

* :class:`CallTracer` is torch.fx's tracer with timm's registry of modules and functions not to trace through (the
  set-up ``features_only=True, feature_cls="fx"`` uses). It records, for every module call, how many graph nodes
  existed when the call began and when it returned: the splitter cuts after a module by that count.
* :class:`ShapeTracer` is the fallback for a ``forward_features`` that branches on tensor *shapes* (``if x.ndim ==
  4``, ``if H % cell``: Gemma 4's ViT), which torch.fx refuses as control flow. It runs every traced operation a
  second time on fake tensors (:class:`torch._subclasses.fake_tensor.FakeTensorMode`: shapes and dtypes, no data)
  of one example input, so a condition computed from shapes has a value: the branch taken for that input size is
  traced, and each decision is recorded. The graph itself still reads shapes at run time (a batch of any size
  runs); only the decisions are fixed, so the splitter checks that a stage gets inputs of the traced size. A
  condition on tensor *values* has no fake value and stays refused, as do conditions that change with the batch
  size (:func:`trace_decisions` traces two batch sizes and compares). Tensor constructors called with traced
  sizes (``torch.ones(B, N)``), which torch.fx cannot record, are recorded during the fallback, and buffers are
  read as graph attributes so methods called on them with traced arguments are recorded too.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = ['CallTracer', 'ShapeTracer', 'notrace']

# constructors torch.fx cannot record when given traced sizes (their size arguments are no tensors)
_CONSTRUCTORS = ('ones', 'zeros', 'empty', 'full', 'eye', 'rand', 'randn', 'randint')
_NO_VALUE = object()


def notrace() -> tuple[list, list]:
    """timm's modules and functions that FX does not trace through (their location moved in timm 1.0.13)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
        return list(get_notrace_modules()), list(get_notrace_functions())
    except ImportError:  # timm <= 1.0.12
        from timm.models import _features_fx as fx_registry
        return list(fx_registry._leaf_modules), list(fx_registry._autowrap_functions)


class CallTracer(fx.Tracer):
    """torch.fx's tracer with timm's set-up, recording where every module call begins and ends in the graph."""
    traced_func_name = 'forward_features'

    def __init__(self):
        leaves, functions = notrace()
        super().__init__(autowrap_functions=tuple(f for f in functions if callable(f)))
        self.leaf_types = tuple(leaves)
        self.path = ''
        self.starts: dict[str, int] = {}
        self.ends: dict[str, int] = {}
        self.outputs: dict[str, Any] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        outer = self.path
        try:
            self.path = self.path_of_module(m)
            self.starts.setdefault(self.path, len(self.graph.nodes))
            out = super().call_module(m, forward, args, kwargs)
            self.ends[self.path] = len(self.graph.nodes)  # nodes created until this call returned
            self.outputs[self.path] = out
            return out
        finally:
            self.path = outer


def _constructor(tracer: ShapeTracer, original):
    def construct(*args, **kwargs):
        found = []
        fx.node.map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
        if found:
            return tracer.create_proxy('call_function', original, args, kwargs)
        return original(*args, **kwargs)
    return construct


class ShapeTracer(CallTracer):
    """:class:`CallTracer` deciding conditions on shapes for one example input size (see the module docstring).

    Args:
        example_shape: The input batch's shape, ``(B, C, H, W)``.

    Attributes:
        decisions: Every condition decided, in order (``True``/``False``).
        shapes: Graph node -> shape of its value for the example input (tensors only), filled by :meth:`trace`.
    """
    proxy_buffer_attributes = True

    def __init__(self, example_shape: tuple[int, ...]):
        super().__init__()
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.example_shape = tuple(example_shape)
        self.decisions: list[bool] = []
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self._input_seen = False
        self._plain = False  # running the fake computation: modules and attributes as plain Python

    def _value(self, v: Any) -> Any:
        return v.node.meta.get('loco_fake', _NO_VALUE) if isinstance(v, fx.Proxy) else v

    def _fake(self, kind: str, target, args, kwargs) -> Any:
        if kind == 'placeholder':  # the image batch; the other arguments are traced with their defaults
            if self._input_seen:
                return _NO_VALUE
            self._input_seen = True
            with self.mode:
                return torch.empty(self.example_shape)
        a, k = fx.node.map_aggregate(args, self._value), fx.node.map_aggregate(kwargs, self._value)
        flat = []
        fx.node.map_aggregate((a, k), flat.append)
        if any(v is _NO_VALUE for v in flat):
            return _NO_VALUE
        if kind == 'get_attr':
            value = self.root
            for atom in target.split('.'):
                value = getattr(value, atom)
            return value
        with self.mode:
            if kind == 'call_function':
                return target(*a, **k)
            if kind == 'call_method':
                return getattr(a[0], target)(*a[1:], **k)
            if kind == 'call_module':
                return self.root.get_submodule(target)(*a, **k)
        return _NO_VALUE

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == 'output':
            return proxy
        self._plain = True
        try:
            value = self._fake(kind, target, args, kwargs)
        except Exception:  # noqa: BLE001 - no value: a condition on it stays refused, as in plain tracing
            value = _NO_VALUE
        finally:
            self._plain = False
        proxy.node.meta['loco_fake'] = value
        if isinstance(value, torch.Tensor):
            self.shapes[proxy.node] = tuple(value.shape)
        return proxy

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self._plain:  # a submodule called while a leaf module runs on fake tensors
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._plain:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._value(obj)
        if isinstance(value, (bool, int)):  # computed from shapes, not from tensor values
            self.decisions.append(bool(value))
            return bool(value)
        return super().to_bool(obj)  # raises torch.fx's TraceError

    def trace(self, root, concrete_args=None) -> fx.Graph:
        originals = {name: getattr(torch, name) for name in _CONSTRUCTORS}
        for name, original in originals.items():
            setattr(torch, name, _constructor(self, original))
        # leaf modules run for their shapes may update buffers in place (BatchNorm's statistics): put them back
        buffers = [(b, b.detach().clone()) for b in root.buffers()] if isinstance(root, nn.Module) else []
        try:
            graph = super().trace(root, concrete_args)
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for name, original in originals.items():
                setattr(torch, name, original)
            for n in self.graph.nodes:  # fake tensors do not outlive the trace
                n.meta.pop('loco_fake', None)
        return graph
