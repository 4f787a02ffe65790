"""The house's shape, read from the source: the folders of `mistral_jax/` are layers, lowest first,
and a module imports only from its own folder or a lower one, with no loop anywhere in the tree;
no file is over 400 lines. Read with `ast`, so a function-level import counts like any other."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Lowest first: each folder may import the ones before it, never the ones after.
LAYERS = ["base", "text", "arch", "parallel", "kernels", "quant", "nn", "model", "io", "inference",
          "serving", "cli"]
PACKAGES = ["mistral_jax", "convert", "train"]
MAX_LINES = 400


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: pathlib.Path, known: dict) -> set[str]:
    """The modules of this repository that `name` imports (a package counts as its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return len(LAYERS)  # the package's top: its __init__ and the `python -m` entry points
    return LAYERS.index(parts[1])


def test_every_folder_is_a_named_layer():
    folders = {p.name for p in (ROOT / "mistral_jax").iterdir()
               if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS)


def test_imports_run_down_the_layers():
    known = modules()
    upward = [f"{name} imports {other}" for name, path in known.items()
              for other in imports(name, path, known)
              if name.startswith("mistral_jax.") and other.startswith("mistral_jax")
              and layer(other) > layer(name)]
    assert upward == []
    # The libraries sit below their command lines: mistral_jax never imports convert or train.
    assert [f"{n} imports {o}" for n, p in known.items() if n.startswith("mistral_jax")
            for o in imports(n, p, known) if not o.startswith("mistral_jax")] == []


def test_no_import_loop():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    state, loops = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                loops.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert loops == []


@pytest.mark.parametrize("folder", ["mistral_jax", "convert", "train", "tests", "bench"])
def test_no_file_over_400_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*"))
            if p.suffix in (".py", ".cc", ".h")
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
