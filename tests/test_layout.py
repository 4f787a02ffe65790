"""The house's shape, read from the source: the folders of `mistral_jax/`, `convert/` and `train/`
are layers, lowest first, and a module imports only from its own folder or a lower one, with no
loop anywhere in the tree; the packages import one way; no file is over 400 lines. Read with
`ast`, so a function-level import counts like any other."""

import ast
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Each package's folders, lowest first: a folder may import the ones before it, never the ones
# after; the package's own top (its __init__ and the `python -m` entries) sits above them all.
LAYERS = {
    "mistral_jax": ["base", "text", "arch", "parallel", "kernels", "quant", "nn", "model", "io",
                    "inference", "serving", "cli"],
    "convert": ["read", "mapping", "formats"],
    "train": ["input", "compute", "run", "plan"],  # plan: `python -m train.plan`, over run
}
ENTRIES = {  # what `python -m` runs, at each package's top
    "mistral_jax": {"generate", "chat", "serve"},
    "convert": {"from_torch", "to_torch", "parity"},
    "train": {"finetune", "dpo", "eval", "merge_lora"},
}
TOPS = {"train": {"api"}}  # beside the entries at a package's top: what they are a layer over
PACKAGES = list(LAYERS)
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
    package, *parts = name.split(".")
    layers = LAYERS[package]
    if not parts or parts[0] not in layers:
        return len(layers)  # the package's top
    return layers.index(parts[0])


@pytest.mark.parametrize("package", PACKAGES)
def test_every_folder_is_a_named_layer(package):
    folders = {p.name for p in (ROOT / package).iterdir()
               if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS[package])
    if package != "mistral_jax":  # convert's and train's tops hold their entries and no more
        top = {p.stem for p in (ROOT / package).glob("*.py")} - {"__init__", "cli"}
        assert top == ENTRIES[package] | TOPS.get(package, set())


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_down_the_layers(package):
    known = modules()
    upward = [f"{name} imports {other}" for name, path in known.items()
              if name.startswith(package + ".")
              for other in imports(name, path, known)
              if other.split(".")[0] == package and layer(other) > layer(name)]
    assert upward == []
    # Across packages one way: train and convert use mistral_jax, which uses neither; convert
    # uses no train (train's default run is the one thing convert.parity borrows, at the top).
    below = {"mistral_jax": set(), "convert": {"mistral_jax", "train"}, "train": {"mistral_jax"}}
    crossing = [f"{n} imports {o}" for n, p in known.items() if n.split(".")[0] == package
                for o in imports(n, p, known)
                if o.split(".")[0] not in below[package] | {package}]
    assert crossing == []


@pytest.mark.parametrize("entry", [f"{p}.{e}" for p in PACKAGES for e in sorted(ENTRIES[p])])
def test_the_entry_points_stay_where_they_are_typed(entry):
    """`python -m <entry>` finds a module that runs its main (a subprocess per entry would cost
    the suite seconds each; the README test runs them as typed)."""
    spec = importlib.util.find_spec(entry)
    assert spec is not None and spec.origin == str(ROOT / (entry.replace(".", "/") + ".py"))
    assert 'if __name__ == "__main__":' in pathlib.Path(spec.origin).read_text()


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
