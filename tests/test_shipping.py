"""Functions from the user's own files travel by value; their remote tracebacks name those files again."""
from __future__ import annotations

import importlib
import pickle
import sys
from pathlib import Path

import cloudpickle

from ticketfarm.client import shipping


def own_module(tmp_path: Path, monkeypatch, name: str = "usermod"):
    (tmp_path / f"{name}.py").write_text("def triple(x):\n    return helper(x) * 3\n\n\ndef helper(x):\n"
                                         "    raise ValueError(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def test_a_function_from_an_uninstalled_file_unpickles_where_that_file_is_not(tmp_path: Path, monkeypatch) -> None:
    module = own_module(tmp_path, monkeypatch)
    shipping.by_value_if_own(module.triple)
    body = cloudpickle.dumps(module.triple)
    monkeypatch.delitem(sys.modules, "usermod")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    try:
        importlib.import_module("usermod")
        raise AssertionError("usermod should not be importable any more")
    except ModuleNotFoundError:
        pass
    assert pickle.loads(body).__name__ == "triple"
    cloudpickle.unregister_pickle_by_value(module)


def test_an_installed_function_still_travels_by_reference() -> None:
    import json

    shipping.by_value_if_own(json.dumps)
    assert "json" not in cloudpickle.list_registry_pickle_by_value()
    assert b"json" in cloudpickle.dumps(json.dumps) and len(cloudpickle.dumps(json.dumps)) < 100


def test_a_remote_traceback_of_by_value_code_names_the_file_and_line(tmp_path: Path, monkeypatch) -> None:
    module = own_module(tmp_path, monkeypatch, "usermod2")
    shipping.by_value_if_own(module.triple)
    try:
        remote = ('Traceback (most recent call last):\n  File "/slave/pyworker.py", line 45, in call\n'
                  '  File "<dynamic-code>", line 2, in triple\n  File "<dynamic-code>", line 6, in helper\n'
                  'ValueError: 1\n')
        named = shipping.named_traceback(remote)
        path = str(tmp_path / "usermod2.py")
        assert f'File "{path}", line 2, in triple\n    return helper(x) * 3\n' in named
        assert f'File "{path}", line 6, in helper\n    raise ValueError(x)\n' in named
        assert '  File "/slave/pyworker.py", line 45, in call\n' in named
        assert shipping.named_traceback('  File "<dynamic-code>", line 9, in nobody\n') == \
            '  File "<dynamic-code>", line 9, in nobody\n'
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def test_plain_values_take_the_c_pickler_and_anything_else_cloudpickle() -> None:
    from ticketfarm import pickles

    plain = [3, 2.5, "x" * 100, b"\0", None, True, 1j, (1, "a"), [1, 2], {"k": 1.5}]
    for value in plain:
        assert pickles.is_plain(value), value
        assert pickles.dumps(value) == pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    local = lambda x: x + 1  # noqa: E731 - by value only: the C pickler cannot carry it
    for value in ((local,), [[1]], {1: 2}, {"k": [1]}, object()):
        assert not pickles.is_plain(value), value
    assert cloudpickle.loads(pickles.dumps((local,)))[0](1) == 2
