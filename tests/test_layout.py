"""The package's layering: imports run one way (foundations -> data -> models -> engine/eval -> io -> inference,
reports -> cli), there is no import cycle, and no simzss import hides inside a function except in ``simzss.cli.*``.

Why the one exception: a command module is imported to build its parser, and ``simzss CMD --help`` must answer in
under 2 s (tests/test_help_speed.py), so it imports only light modules at the top and the heavy ones (torch,
spaCy, Gradio and the simzss modules that pull them in) inside ``main()`` after parsing. Those function-level
imports still go downward only and count in the cycle check, exactly like top-level ones. Everywhere else a
hidden import would hide a layering mistake, so it stays forbidden.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "simzss"

# Module prefix -> layer; the longest matching prefix wins. Lower layers never import higher ones.
LAYERS: Dict[str, int] = {
    "simzss.config": 0,
    "simzss.losses": 0,
    "simzss.resources": 0,
    "simzss.concepts": 0,
    "simzss.logs": 0,
    "simzss.helpformat": 0,
    "simzss.weights_files": 0,
    "simzss.data": 1,
    "simzss.models": 2,
    "simzss.baselines": 2,
    "simzss.engine": 3,
    "simzss.eval": 3,
    "simzss.io": 4,
    "simzss.inference": 5,
    "simzss.reports": 5,
    "simzss.cli": 6,
    "simzss.__main__": 6,
}
# `from simzss import SimZSS` (the Hugging Face convention) is served lazily by the package root.
FACADE = "simzss"
# Command modules import heavy modules inside main() so that `--help` stays fast (see the module docstring).
LAZY_IMPORTS_ALLOWED = "simzss.cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layout.py")
    return LAYERS[best]


def simzss_imports(path: Path) -> Iterator[Tuple[str, int, bool]]:
    """(imported simzss module, line, inside a function) for every import statement of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    nested: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from simzss.x import y` may name a submodule y
            names = [f"{base}.{a.name}" if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).exists()
                     or (PACKAGE.parent / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists() else base
                     for a in node.names]
        for name in names:
            if name == FACADE or name.startswith(FACADE + "."):
                yield name, node.lineno, id(node) in nested


def graph() -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        edges.setdefault(module_name(path), set()).update(m for m, _, _ in simzss_imports(path))
    return edges


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_run_downward(path: Path) -> None:
    me = module_name(path)
    if me == FACADE:
        return
    upward = [f"line {line}: {name} (layer {layer(name)})" for name, line, _ in simzss_imports(path)
              if name != FACADE and layer(name) > layer(me)]
    assert not upward, f"{me} (layer {layer(me)}) imports upward: {upward}"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_no_simzss_import_inside_functions(path: Path) -> None:
    me = module_name(path)
    if me == LAZY_IMPORTS_ALLOWED or me.startswith(LAZY_IMPORTS_ALLOWED + "."):
        return
    hidden = [f"line {line}: {name}" for name, line, inside in simzss_imports(path) if inside]
    if me == FACADE:  # the lazy `from simzss import SimZSS`
        hidden = [h for h in hidden if "simzss.models.simzss" not in h]
    assert not hidden, f"{me} imports simzss modules inside functions: {hidden}"


def test_no_import_cycles() -> None:
    edges = graph()
    edges.pop(FACADE, None)
    # Tarjan's strongly connected components
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w == FACADE or w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_lazy_imports_only_in_cli() -> None:
    """The exemption covers the command modules and nothing else; their hidden imports still count as edges."""
    outside = [module_name(p) for p in FILES if any(inside for _, _, inside in simzss_imports(p))
               and not module_name(p).startswith(LAZY_IMPORTS_ALLOWED) and module_name(p) != FACADE]
    assert not outside, f"function-level simzss imports outside simzss.cli: {outside}"
    train = PACKAGE / "cli" / "train.py"
    assert "simzss.engine.trainer" in {m for m, _, _ in simzss_imports(train)}, "hidden imports must stay visible"


def test_layer_lookup() -> None:
    """The layer table orders the stages as documented and refuses a module it does not know."""
    assert layer("simzss.models.simzss") > layer("simzss.data.stream")
    assert layer("simzss.cli.eval") > layer("simzss.io.load") > layer("simzss.eval.segmentation")
    with pytest.raises(AssertionError, match="no layer"):
        layer("simzss.nowhere")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_every_module_says_what_it_is_for(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc and len(doc.split()) >= 4, f"{module_name(path)} needs a module docstring saying what it is for"
