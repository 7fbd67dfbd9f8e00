"""No import loop inside the training package (training/scripts/import_cycles.py)."""
import importlib.util
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_cycles", TRAINING / "scripts" / "import_cycles.py")
import_cycles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_cycles)


def test_no_import_cycles_in_dcam():
    assert import_cycles.find_cycles(import_cycles.import_graph(TRAINING / "dcam")) == []


def test_the_checker_finds_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .c import y  # lazy imports count\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from . import a\n")
    assert import_cycles.find_cycles(import_cycles.import_graph(pkg)) == [["a", "b", "c", "a"]]
