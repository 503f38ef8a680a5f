"""The house's walls: the methods stand below the engine (they get the run through the
`RunContext` protocol of udafast.methods.context, never from udafast.engine), and the engine's
context implements that protocol."""
import ast
import inspect
import os
import subprocess
import sys

import pytest

import udafast.methods
from udafast.engine.context import TrainingContext
from udafast.methods.context import RunContext, Stream

METHODS_DIR = os.path.dirname(udafast.methods.__file__)
METHOD_MODULES = sorted(f[:-3] for f in os.listdir(METHODS_DIR) if f.endswith(".py"))


def _imported_modules(path):
    """Every module an import statement of the file names, at any depth (lazy imports too)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("module", METHOD_MODULES)
def test_no_method_module_imports_the_engine(module):
    path = os.path.join(METHODS_DIR, module + ".py")
    engine = [name for name in _imported_modules(path) if name.split(".")[:2] == ["udafast", "engine"]]
    assert not engine, f"udafast/methods/{module}.py imports {engine}"


def test_importing_the_methods_loads_no_engine():
    """Not even through a module they import: each methods module in a fresh interpreter."""
    names = ", ".join(repr(f"udafast.methods.{m}") for m in METHOD_MODULES if m != "__init__")
    code = ("import importlib, sys\n"
            f"for name in [{names}]:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[:2] == ['udafast', 'engine']))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(udafast.methods.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _protocol_members(protocol):
    return {name for name in dir(protocol) if not name.startswith("_")} | set(protocol.__annotations__)


def test_the_engine_context_has_every_member_of_the_protocol():
    """Methods: what the protocol declares; attributes are set in __init__, so read from there."""
    source = inspect.getsource(TrainingContext)
    for name in sorted(_protocol_members(RunContext)):
        assert hasattr(TrainingContext, name) or f"self.{name} =" in source or f"self.{name}," in source, name


def test_the_engine_streams_have_every_member_of_the_stream_protocol():
    from udafast.engine.data import BatchStream
    source = inspect.getsource(BatchStream)
    for name in sorted(_protocol_members(Stream) | {"__next__"}):
        assert hasattr(BatchStream, name) or f"self.{name} =" in source or f"self.{name}," in source, name


def _context_members_used(path):
    """The members of the run context a methods module reads: `self.ctx.X`, `ctx.X` and
    `getattr(self.ctx, "X", ...)` (a `ctx` of a torch.autograd.Function's forward and backward
    is not the run's)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    autograd = {id(a) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                and node.name in ("forward", "backward") and node.args.args and node.args.args[0].arg == "ctx"
                for a in ast.walk(node)}
    used = set()
    for node in ast.walk(tree):
        if id(node) in autograd:
            continue
        if isinstance(node, ast.Attribute):
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "ctx") or \
                    (isinstance(base, ast.Attribute) and base.attr == "ctx"):
                used.add(node.attr)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2:
            target, name = node.args[:2]
            if isinstance(target, ast.Attribute) and target.attr == "ctx" and isinstance(name, ast.Constant):
                used.add(name.value)
    return used


def test_the_protocol_lists_every_member_the_methods_use():
    declared = _protocol_members(RunContext)
    for module in METHOD_MODULES:
        missing = _context_members_used(os.path.join(METHODS_DIR, module + ".py")) - declared
        assert not missing, f"udafast/methods/{module}.py uses ctx.{sorted(missing)}, not in RunContext"
