"""The package's folders are layers (docs/package.md): each imports only from the folders below it, no modules import
each other in a circle, `runtime/errors.py` imports nothing of ours and no ML library, and an import of ours written
inside a function is only the matplotlib one (a function-level import must never hide a circle). Read from the code
with ast, as ../shared/tools/import_layers.py reads it."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "chatgpt_recipes"
LAYERS = ["runtime", "data", "modeling", "rl", "evaluation", "training", "self_instruct", "cli"]
FUNCTION_LEVEL_ALLOWED = {("chatgpt_recipes.evaluation.reporting", "plt")}  # matplotlib, only when a plot is drawn


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, tuple[str, ...], bool]]:
    """(module imported, names, inside a function) for every import of the package in `path`."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chatgpt_recipes"):
            names = tuple(alias.name for alias in node.names)
            if node.module == "chatgpt_recipes" or all(
                    (PACKAGE.parent / (node.module + "." + name).replace(".", "/")).with_suffix(".py").is_file()
                    or (PACKAGE.parent / (node.module + "." + name).replace(".", "/")).is_dir() for name in names):
                for name in names:  # `from chatgpt_recipes.runtime import compat`: the module compat
                    found.append((f"{node.module}.{name}", (), id(node) in in_function))
            else:
                found.append((node.module, names, id(node) in in_function))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("chatgpt_recipes"):
                    found.append((alias.name, (), id(node) in in_function))
    return found


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        edges[module_name(path)] = {imported for imported, _, _ in imports_of(path)}
    return edges


def test_every_module_is_in_a_layer():
    assert all(layer_of(module) >= 0 for module in graph() if module != "chatgpt_recipes"), sorted(graph())


def test_no_import_runs_back_up_a_layer():
    back_up = [(module, imported) for module, imported_set in graph().items() for imported in imported_set
               if layer_of(imported) > layer_of(module)]
    assert not back_up


def test_no_import_circle():
    edges = graph()
    state, circle = {}, []

    def visit(module, stack):
        state[module] = "open"
        for imported in sorted(edges.get(module, ())):
            if state.get(imported) == "open":
                circle.append(stack[stack.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, stack + [imported])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circle


def test_errors_import_nothing_of_ours_and_no_library():
    tree = ast.parse((PACKAGE / "runtime" / "errors.py").read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_function_level_imports_of_ours_are_only_the_matplotlib_one():
    hidden = [(module_name(path), imported, names) for path in PACKAGE.rglob("*.py")
              for imported, names, inside in imports_of(path) if inside
              and not all((imported, name) in FUNCTION_LEVEL_ALLOWED for name in names or ("",))]
    assert not hidden


def test_the_checker_sees_a_circle_and_an_import_back_up(tmp_path, monkeypatch):
    """The checks above can fail: a package whose runtime imports data (back up) and whose data imports runtime."""
    import sys

    package = tmp_path / "chatgpt_recipes"
    for layer, text in (("runtime", "from chatgpt_recipes.data.rows import x\n"),
                        ("data", "from chatgpt_recipes.runtime.errors import y\n")):
        (package / layer).mkdir(parents=True)
        (package / layer / ("errors.py" if layer == "runtime" else "rows.py")).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    with_back_up = [(m, i) for m, s in graph().items() for i in s if layer_of(i) > layer_of(m)]
    assert with_back_up == [("chatgpt_recipes.runtime.errors", "chatgpt_recipes.data.rows")]
    try:
        test_no_import_circle()
    except AssertionError:
        pass
    else:
        raise AssertionError("the circle runtime.errors <-> data.rows was not found")
