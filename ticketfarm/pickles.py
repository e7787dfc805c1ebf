"""How task arguments and values are pickled: the C pickler for plain data, cloudpickle for anything else."""
from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

#: Types the C pickler writes exactly as cloudpickle would (no code, no classes by reference), ten times faster.
PLAIN = frozenset({int, float, bool, str, bytes, type(None), complex})


def is_plain(value: Any) -> bool:
    """A plain value, or a tuple, list or dict (of str keys) of plain values one level deep."""
    kind = type(value)
    if kind in PLAIN:
        return True
    if kind is tuple or kind is list:
        return all(type(v) in PLAIN for v in value)
    if kind is dict:
        return all(type(k) is str and type(v) in PLAIN for k, v in value.items())
    return False


def dumps(value: Any) -> bytes:
    """`value` pickled (HIGHEST_PROTOCOL); cloudpickle unless it is plain data (see is_plain)."""
    if is_plain(value):
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

