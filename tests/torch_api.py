"""Every torch API the project's code names, checked against the torch this interpreter runs.

The webuis give the extension their own torch (2.0.1 in webui 1.6.0, 2.1.2 in 1.10.1), older than the one the
tests run on, so a torch attribute or keyword that is newer would fail only for users. This module reads the
code (nothing is imported from it) and lists each ``torch.*`` name it uses and each keyword it passes to a torch
function, then resolves them in the running torch. A use inside ``if hasattr(x, "name")`` (or its conditional
expression) is a guarded fallback and is not required.

    python tests/torch_api.py [FILES...]      # exit 1 and list what is missing (default: the project's code)
"""
from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What runs inside a webui: the core, the compat layer and the entry point. The standalone backend and the toy
# world serve the command line, which installs its own (recent) torch with diffusers.
CHECKED = ("dreamartist/*.py", "extensions_builtin_compat/*.py", "scripts/*.py", "install.py")


def project_files() -> list[Path]:
    return sorted(p for pattern in CHECKED for p in ROOT.glob(pattern))


def _chain(node: ast.AST) -> str | None:
    """'torch.utils.checkpoint.checkpoint' for that attribute chain, None when it is not rooted at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _guards(tree: ast.AST) -> set[int]:
    """ids of the nodes inside the true branch of an ``if hasattr(...)`` test (statement or expression)."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, (ast.If, ast.IfExp)) and isinstance(test, ast.Call) and getattr(test.func, "id", "") \
                == "hasattr":
            body = node.body if isinstance(node.body, list) else [node.body]
            guarded |= {id(inner) for part in body for inner in ast.walk(part)}
    return guarded


def torch_uses(path: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """(names, (function, keyword) pairs) of torch that ``path`` uses outside hasattr guards."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = _guards(tree)
    aliases = {"torch": "torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":  # import torch.nn.functional as F: F is that module
                    aliases[alias.asname or "torch"] = alias.name if alias.asname else "torch"
    names, keywords = set(), set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        chain = _chain(node) if isinstance(node, (ast.Attribute, ast.Name)) else None
        if chain and chain.split(".")[0] in aliases:
            head, _, rest = chain.partition(".")
            names.add(".".join(filter(None, [aliases[head], rest])))
        if isinstance(node, ast.Call) and node.keywords:
            function = _chain(node.func)
            if function and function.split(".")[0] in aliases:
                head, _, rest = function.partition(".")
                full = ".".join(filter(None, [aliases[head], rest]))
                keywords |= {(full, k.arg) for k in node.keywords if k.arg}
    return names, keywords


def _resolve(name: str):
    """The object a dotted torch name refers to, importing submodules as needed; raises when it is absent."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i + 1]))
    return obj


def _longest_resolvable(name: str) -> tuple[str, bool]:
    """Trailing parts that are attributes of an instance (e.g. ``.shape``) cannot be checked statically: the
    name is cut back to its longest prefix that is a module; whether that prefix resolves is what counts."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        try:
            _resolve(prefix)
            return prefix, end == len(parts) or not inspect.ismodule(_resolve(prefix))
        except (AttributeError, ImportError):
            continue
    return parts[0], False


def missing(files: list[Path]) -> list[str]:
    """What the running torch lacks of what ``files`` use: names and keywords."""
    names, keywords = set(), set()
    for path in files:
        n, k = torch_uses(path)
        names |= n
        keywords |= k
    problems = []
    for name in sorted(names):
        prefix, ok = _longest_resolvable(name)
        if not ok:
            problems.append(f"{name} (torch has {prefix} but not the rest)")
    for function, keyword in sorted(keywords):
        try:
            parameters = inspect.signature(_resolve(function)).parameters
        except (AttributeError, ImportError, TypeError, ValueError):
            continue  # not a function whose signature Python can read (a builtin, a class with C init)
        if keyword not in parameters and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            problems.append(f"{function}({keyword}=...)")
    return problems


if __name__ == "__main__":
    import torch

    targets = [Path(a) for a in sys.argv[1:]] or project_files()
    found = missing(targets)
    print(f"torch {torch.__version__}: {len(found)} missing" + "".join(f"\n  {p}" for p in found))
    sys.exit(1 if found else 0)
