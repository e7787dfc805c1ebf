"""The package layout kept honest: imports run one way, no module reaches into another's private names."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("master", "slave", "ticketfarm")
#: ticketfarm modules that are client code (they may import master and slave); the rest is the shared core.
CLIENT = ("ticketfarm.client", "ticketfarm.cli", "ticketfarm.cli_http", "ticketfarm.deploy", "ticketfarm.rollout",
          "ticketfarm.parallel", "ticketfarm.__main__")
#: Underscore attributes that are a public API despite their name (the stdlib's own conventions).
PUBLIC_UNDERSCORE = {"_exit", "_replace", "_asdict", "_fields", "_make", "_getframe"}


@dataclass
class Module:
    """One source file: its dotted name, its imports and its private-name uses."""

    name: str
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def load_modules() -> dict[str, Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = module_name(path)
            modules[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    for module in modules.values():
        module.imports = imported_modules(module, modules)
    return modules


def imported_modules(module: Module, known: dict[str, Module]) -> set[str]:
    """The project modules a module imports, anywhere in it (TYPE_CHECKING blocks and functions included)."""
    found = set()
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {name for name in found if name in known and name != module.name}


def find_cycle(modules: dict[str, Module]) -> list[str] | None:
    """One import cycle as a list of module names (first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for target in sorted(modules[name].imports):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(modules):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def private_uses(module: Module) -> list[str]:
    """`from x import _y`, and `obj._name` on anything but self, cls or a class of the same module named in it."""
    local_classes = {n.name for n in ast.walk(module.tree) if isinstance(n, ast.ClassDef)}
    where = module.path.relative_to(REPO)
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            found += [f"{where}:{node.lineno}: from {node.module} import {a.name}"
                      for a in node.names if is_private(a.name)]
        elif isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in PUBLIC_UNDERSCORE:
            owner = node.value
            if isinstance(owner, ast.Name) and (owner.id in ("self", "cls") or owner.id in local_classes):
                continue
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def layer(name: str) -> str:
    if name == "ticketfarm":
        return "face"  # the package's face hands on names of every layer (Cluster lazily)
    if name.startswith(("master", "slave")):
        return name.split(".")[0]
    return "client" if name.startswith(CLIENT) else "core"


MODULES = load_modules()


def test_imports_form_no_cycle() -> None:
    assert find_cycle(MODULES) is None, " -> ".join(find_cycle(MODULES) or [])


def test_no_module_uses_another_modules_private_names() -> None:
    uses = [use for module in MODULES.values() for use in private_uses(module)]
    assert uses == [], "\n".join(uses)


@pytest.mark.parametrize("importer,forbidden", [
    ("slave", {"master", "client"}),
    ("master", {"client"}),
    ("core", {"master", "slave", "client"}),
])
def test_layers_import_downwards_only(importer: str, forbidden: set[str]) -> None:
    wrong = sorted(f"{m.name} imports {target}" for m in MODULES.values() if layer(m.name) == importer
                   for target in m.imports if layer(target) in forbidden)
    assert wrong == []


def test_every_module_says_what_it_owns_in_one_line() -> None:
    missing = []
    for module in MODULES.values():
        lines = (ast.get_docstring(module.tree) or "").splitlines() or [""]
        if not lines[0].strip() or (len(lines) > 1 and lines[1].strip()):
            missing.append(str(module.path.relative_to(REPO)))
    assert missing == []


#: Store methods that change a task's, a ticket's or a sweep's state.
STATE_WRITERS = {"add_sweep", "add_tasks", "reopen_sweep", "set_sweep_state", "start_tickets", "finish_ticket",
                 "complete_task", "fail_task", "requeue_task", "cancel_task", "cancel_tasks", "hold_task",
                 "refund_attempt"}
#: The task lifecycle (and the store itself).
STATE_OWNERS = {"master.lifecycle", "master.store"}


def test_only_the_lifecycle_writes_task_and_ticket_state() -> None:
    writers = sorted(f"{m.name}:{node.lineno}: {node.func.attr}" for m in MODULES.values()
                     if m.name.startswith("master") and m.name not in STATE_OWNERS
                     for node in ast.walk(m.tree) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Attribute) and node.func.attr in STATE_WRITERS
                     and "store" in ast.unparse(node.func.value).split("."))
    assert writers == []


def test_the_checks_catch_what_they_guard(tmp_path: Path) -> None:
    """The scanner itself: a private access, a private import and a cycle are each found."""
    sample = Module("master.sample", REPO / "master" / "sample.py", ast.parse(
        '"""Sample."""\nfrom master.server import _hidden\n\n\ndef f(master):\n    return master._send\n'))
    assert len(private_uses(sample)) == 2
    a = Module("a", tmp_path / "a.py", ast.parse(""), {"b"})
    b = Module("b", tmp_path / "b.py", ast.parse(""), {"a"})
    assert find_cycle({"a": a, "b": b}) == ["a", "b", "a"]
