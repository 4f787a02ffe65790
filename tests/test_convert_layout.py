"""convert/'s shape, read from the source as tests/test_layout.py reads mistral_jax/'s: its
folders are layers, lowest first, and a module imports only its own folder or a lower one; the
`python -m convert.*` entry points sit above them all."""

import importlib.util
import pathlib

import pytest

from tests.test_layout import ROOT, imports, modules

LAYERS = ["read", "mapping", "formats"]  # lowest first; the package's top is above them


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else len(LAYERS)


def test_every_folder_is_a_named_layer():
    folders = {p.name for p in (ROOT / "convert").iterdir()
               if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS)
    assert {p.stem for p in (ROOT / "convert").glob("*.py")} == {
        "__init__", "cli", "from_torch", "to_torch", "parity"}  # only the entries at the top


def test_imports_run_down_the_layers():
    known = modules()
    upward = [f"{name} imports {other}" for name, path in known.items()
              if name.startswith("convert.")
              for other in imports(name, path, known)
              if other.startswith("convert") and layer(other) > layer(name)]
    assert upward == []
    # The layers below the top reach no entry point, and nothing of train/.
    assert [f"{n} imports {o}" for n, p in known.items() if layer(n) < len(LAYERS)
            and n.startswith("convert.") for o in imports(n, p, known)
            if o.startswith("train") or (o.startswith("convert") and layer(o) == len(LAYERS)
                                         and o != "convert")] == []


@pytest.mark.parametrize("entry", ["from_torch", "to_torch", "parity"])
def test_the_entry_points_stay_where_they_are_typed(entry):
    """`python -m convert.<entry>` finds a module that runs its main (a subprocess per entry
    would cost the suite seconds each; tests/test_first_hour.py runs from_torch's)."""
    spec = importlib.util.find_spec(f"convert.{entry}")
    assert spec is not None and spec.origin == str(ROOT / "convert" / f"{entry}.py")
    assert 'if __name__ == "__main__":' in pathlib.Path(spec.origin).read_text()
