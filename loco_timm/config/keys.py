"""Declaring recipe keys once: each key of a config dataclass carries its section, help, choices and whether a
resumed run must match it, and everything else (type checks, choices, resume checks, command-line options, the
documentation's key tables) is read from that declaration.

    @dataclass
    class TrainConfig:
        mode: str = learner('loco', resume=True, choices=MODES, help='e2e SimCLR, Greedy InfoMax or LoCo units')

A field declared without :func:`key` has no section: :func:`declared_keys` refuses such a class (the tests call it on
every config), so a new key cannot be left unclassified.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ['key', 'section_key', 'Key', 'declared_keys', 'check_values', 'from_dict', 'apply_overrides', 'to_json']


@dataclasses.dataclass(frozen=True)
class Key:
    """A declared recipe key, as read back from its dataclass field."""
    name: str
    section: str
    help: str
    resume: bool
    choices: tuple | None
    default: Any
    type: Any


def key(default: Any = dataclasses.MISSING, *, section: str, help: str, resume: bool,
        choices: tuple | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field declaring one recipe key.

    Args:
        default: Its default value (or ``factory`` for a mutable one).
        section: The recipe section it belongs to (``learner``, ``data``, ``optimisation`` ...).
        help: One line for ``--help`` and the documentation.
        resume: Whether a resumed run must have the checkpoint's value (it changes what the run trains).
        choices: The valid values, where there is a fixed set.
    """
    metadata = dict(section=section, help=help, resume=resume, choices=tuple(choices) if choices else None)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section_key(section: str) -> Callable[..., Any]:
    """:func:`key` with ``section`` filled in, for declaring a section's keys."""
    return functools.partial(key, section=section)


@functools.cache
def declared_keys(cls: type) -> tuple[Key, ...]:
    """Every key of config dataclass ``cls`` with its declaration.

    Raises:
        TypeError: A field not declared with :func:`key` (a bug in the config class, not the user's input).
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if 'section' not in f.metadata:
            raise TypeError(f'{cls.__name__}.{f.name} is not declared with loco_timm.config.keys.key(): give it a '
                            f'section, help and resume classification')
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Key(f.name, f.metadata['section'], f.metadata['help'], f.metadata['resume'],
                       f.metadata['choices'], default, hints[f.name]))
    return tuple(out)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return f'{args[0].__name__} or null' if args else getattr(hint, '__name__', str(hint))


def check_values(cfg: Any) -> None:
    """Every key's type and choices, as declared.

    Raises:
        ConfigError: One line naming the first bad key, its value and what is valid.
    """
    for k in declared_keys(type(cfg)):
        value = getattr(cfg, k.name)
        if not _type_ok(value, k.type):
            raise ConfigError(f'{k.name}={value!r} has the wrong type: expected {_type_name(k.type)}')
        if k.choices is not None and value not in k.choices:
            valid = ', '.join(str(c) for c in k.choices if c is not None)
            raise ConfigError(f'{k.name}={value!r} is not valid: choose one of {valid}')


def from_dict(cls: type, values: dict, where: str = '') -> Any:
    """Build ``cls`` from a dict, refusing unknown keys with a list of the valid ones."""
    if not isinstance(values, dict):
        raise ConfigError(f'{where or cls.__name__} must be a mapping of keys to values, got {type(values).__name__}')
    valid = [k.name for k in declared_keys(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f'unknown key(s) {", ".join(unknown)} in {where or cls.__name__}: valid keys are '
                          f'{", ".join(valid)}')
    return cls(**_coerce_floats(cls, values))


def _coerce_floats(cls: type, values: dict) -> dict:
    """Float keys accept ints and YAML 1.1's unparsed exponent strings ('1e-6')."""
    types_ = {k.name: k.type for k in declared_keys(cls)}
    out = dict(values)
    for name, value in values.items():
        allowed = typing.get_args(types_[name]) or (types_[name],)
        if float in allowed and not isinstance(value, bool):
            if isinstance(value, int):
                out[name] = float(value)
            elif isinstance(value, str):
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out


def apply_overrides(values: dict, overrides: dict[str, str], cls: type) -> dict:
    """Merge ``--key value`` strings (parsed as YAML scalars/lists) into ``values`` for dataclass ``cls``."""
    valid = {k.name for k in declared_keys(cls)}
    merged = dict(values)
    for name, text in overrides.items():
        if name not in valid:
            raise ConfigError(f'unknown option {name}: valid keys are {", ".join(sorted(valid))}')
        try:
            merged[name] = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError:
            raise ConfigError(f'{name}={text!r} cannot be parsed as a value') from None
    return merged


def to_json(cfg: Any) -> dict:
    """A config as plain JSON values (what checkpoints and results record)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
