#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Check KVBridgeConnector against one vLLM release's KV-connector API, from
that release's source alone (nothing is imported: a GPU build of vLLM can be
checked on a machine that cannot import it).

    python scripts/check_vllm_api.py PATH_TO_VLLM_SOURCE

PATH_TO_VLLM_SOURCE holds the ``vllm`` package (an unpacked wheel or sdist,
a site-packages folder, a git checkout) or is that package. Checked:

* every abstract method of ``KVConnectorBase_V1`` and ``SupportsHMA`` is
  implemented by ``KVBridgeConnector``;
* every method KVBridgeConnector overrides keeps the base's parameters: same
  names in the same order, no extra required parameter, ``*args`` /
  ``**kwargs`` where the base has them, the same kind (method, classmethod);
* every name ``kvbridge/vllm/*.py`` imports from ``vllm`` exists in that
  source (names imported under a ``try`` that falls back, or only for type
  checking, are reported, not failed).

Reported, not failed: the base's hooks KVBridgeConnector leaves to their
defaults, and the connector's methods this release never calls. Exit status
0 when compatible, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONNECTOR = ROOT / "kvbridge" / "vllm" / "connector.py"
BASE_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.base"


@dataclass
class Method:
    name: str
    kind: str  # "method", "classmethod", "staticmethod", "property"
    params: list[str]  # positional-or-keyword, self/cls excluded
    required: int  # how many of ``params`` have no default
    kwonly: list[str]
    kwonly_required: list[str]
    varargs: bool
    varkw: bool
    abstract: bool

    def describe(self) -> str:
        parts = list(self.params)
        if self.varargs:
            parts.append("*args")
        parts += self.kwonly
        if self.varkw:
            parts.append("**kwargs")
        return f"{self.name}({', '.join(parts)})"


@dataclass
class ClassInfo:
    name: str
    bases: list[str]
    methods: dict[str, Method] = field(default_factory=dict)


def _decorators(fn: ast.FunctionDef) -> set[str]:
    out = set()
    for d in fn.decorator_list:
        if isinstance(d, ast.Name):
            out.add(d.id)
        elif isinstance(d, ast.Attribute):
            out.add(d.attr)
    return out


def _method(fn: ast.FunctionDef) -> Method:
    decos = _decorators(fn)
    kind = next((k for k in ("classmethod", "staticmethod", "property") if k in decos), "method")
    a = fn.args
    positional = [p.arg for p in a.posonlyargs + a.args]
    if kind != "staticmethod" and positional:
        positional = positional[1:]  # self / cls
    required = len(positional) - len(a.defaults)
    kwonly = [p.arg for p in a.kwonlyargs]
    kwonly_required = [p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    return Method(fn.name, kind, positional, required, kwonly, kwonly_required,
                  a.vararg is not None, a.kwarg is not None, "abstractmethod" in decos)


def classes_in(path: Path) -> dict[str, ClassInfo]:
    tree = ast.parse(path.read_text(), str(path))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            info = ClassInfo(node.name, [ast.unparse(b) for b in node.bases])
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    info.methods[item.name] = _method(item)
            out[node.name] = info
    return out


def signature_problems(base: Method, ours: Method) -> list[str]:
    """Why ``ours`` cannot stand in for ``base`` wherever vLLM calls it."""
    problems = []
    if base.kind != ours.kind:
        problems.append(f"is a {ours.kind}, vLLM's is a {base.kind}")
    if ours.params[:len(base.params)] != base.params and not ours.varargs:
        problems.append(f"parameters {ours.params} differ from vLLM's {base.params}")
    if ours.required > len(base.params) or ours.kwonly_required:
        extra = ours.params[len(base.params):ours.required] + ours.kwonly_required
        if extra:
            problems.append(f"requires {extra}, which vLLM does not pass")
    missing_kw = [k for k in base.kwonly if k not in ours.kwonly and k not in ours.params]
    if missing_kw and not ours.varkw:
        problems.append(f"lacks keyword parameters {missing_kw}")
    if base.varargs and not ours.varargs:
        problems.append("lacks *args, which vLLM's has")
    if base.varkw and not ours.varkw:
        problems.append("lacks **kwargs, which vLLM's has")
    return problems


def module_file(src: Path, module: str) -> Path | None:
    parts = module.split(".")
    for cand in (src.joinpath(*parts).with_suffix(".py"), src.joinpath(*parts, "__init__.py")):
        if cand.is_file():
            return cand
    return None


def top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at top level (inside if/try too)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                visit(getattr(node, "finalbody", []))
    visit(tree.body)
    return names


def vllm_imports(path: Path) -> list[tuple[str, str, str]]:
    """(module, name, how) for each ``from vllm... import name`` in ``path``;
    how: "required", "optional" (under a try whose except catches the
    ImportError: the code falls back) or "typing"."""
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(body, how):
        for node in body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
                out.extend((node.module, a.name, how) for a in node.names)
            elif isinstance(node, ast.If):
                typing = "TYPE_CHECKING" in ast.unparse(node.test)
                visit(node.body, "typing" if typing else how)
                visit(node.orelse, how)
            elif isinstance(node, ast.Try):
                # A handler that catches the ImportError (or anything wider):
                # the code has a fallback for this name.
                guarded = any(h.type is None or any(
                    n in ast.unparse(h.type) for n in ("ImportError", "ModuleNotFoundError",
                                                       "Exception"))
                    for h in node.handlers)
                visit(node.body, "optional" if guarded else how)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(node.body, how)
    visit(tree.body, "required")
    return out


def find_source(path: Path) -> Path:
    """The folder that holds the ``vllm`` package."""
    path = path.resolve()
    if (path / "vllm" / "__init__.py").is_file():
        return path
    if path.name == "vllm" and (path / "__init__.py").is_file():
        return path.parent
    raise SystemExit(f"check_vllm_api: no vllm package in {path}")


def version_of(src: Path) -> str:
    for name in ("_version.py", "version.py"):
        f = src / "vllm" / name
        if f.is_file():
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Assign) and any(
                        getattr(t, "id", None) in ("__version__", "version")
                        for t in node.targets) and isinstance(node.value, ast.Constant):
                    return str(node.value.value)
    return "unknown"


def check(src: Path, connector_path: Path = CONNECTOR) -> tuple[list[str], list[str]]:
    """(errors, notes) for KVBridgeConnector against the vLLM source in ``src``."""
    errors: list[str] = []
    notes: list[str] = []
    base_file = module_file(src, BASE_MODULE)
    if base_file is None:
        return [f"{BASE_MODULE} not found under {src}"], notes
    vllm_classes = classes_in(base_file)
    base = vllm_classes.get("KVConnectorBase_V1")
    if base is None:
        return [f"no KVConnectorBase_V1 in {base_file}"], notes
    ours = classes_in(connector_path).get("KVBridgeConnector")
    assert ours is not None, f"no KVBridgeConnector in {connector_path}"

    # The vLLM classes KVBridgeConnector derives from, KVConnectorBase_V1 last
    # so its signatures win where a mixin declares the same hook.
    parents = [vllm_classes[b] for b in ours.bases if b in vllm_classes and b != base.name]
    parents.append(base)
    for b in ours.bases:
        if b not in vllm_classes:
            errors.append(f"KVBridgeConnector's base {b} does not exist in {base_file.name}")
    hooks: dict[str, Method] = {}
    for parent in parents:
        hooks.update(parent.methods)

    for name, hook in sorted(hooks.items()):
        if name.startswith("_") and name != "__init__":
            continue
        mine = ours.methods.get(name)
        if mine is None:
            if hook.abstract:
                errors.append(f"abstract {hook.describe()} is not implemented")
            continue
        for p in signature_problems(hook, mine):
            errors.append(f"{name}: {p}")

    defaults = sorted(n for n, h in hooks.items()
                      if not n.startswith("_") and not h.abstract and n not in ours.methods)
    notes.append(f"hooks left to vLLM's defaults: {', '.join(defaults)}")
    unused = sorted(n for n in ours.methods if not n.startswith("_") and n not in hooks)
    if unused:
        notes.append(f"KVBridgeConnector methods this release never calls: {', '.join(unused)}")

    for py in sorted((ROOT / "kvbridge" / "vllm").glob("*.py")):
        for module, name, how in vllm_imports(py):
            f = module_file(src, module)
            found = f is not None and (name in top_level_names(f)
                                       or module_file(src, f"{module}.{name}") is not None)
            if found:
                continue
            where = f"{py.relative_to(ROOT)}: from {module} import {name}"
            if how == "required":
                errors.append(f"{where}: not in this release")
            else:
                notes.append(f"{where}: not in this release ({how} import)")
    return errors, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vllm_source", type=Path,
                    help="folder holding the vllm package (or the package itself)")
    args = ap.parse_args(argv)
    src = find_source(args.vllm_source)
    errors, notes = check(src)
    print(f"KVBridgeConnector vs vLLM {version_of(src)} ({src})")
    for n in notes:
        print(f"  note: {n}")
    for e in errors:
        print(f"  INCOMPATIBLE: {e}")
    print("  result: " + ("compatible" if not errors else f"{len(errors)} problem(s)"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
