"""The house rules: one namespace, layers that only point down, rooms of one job.

These run with the suite so that a new module or import that breaks a rule
fails CI, not a reviewer's memory.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tiesfed"
MAX_MODULE_LINES = 600


def _layers() -> list[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in cfg["contracts"] if c["type"] == "layers"]
    names = []
    for layer in contract["layers"]:
        names += [n.strip() for n in layer.replace("|", ":").split(":")]
    return names


def test_import_layers_contract_is_kept():
    """import-linter's layers contract (pyproject.toml) holds for the whole package."""
    exe = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_every_module_belongs_to_a_layer():
    """A new top-level module or package outside the contract would escape the check."""
    layered = {n.removeprefix("tiesfed.") for n in _layers()}
    top = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    top |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert top - layered == set(), f"not in any layer of the import contract: {sorted(top - layered)}"


def test_no_hand_written_module_is_too_long():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if "_pb2" not in p.name and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


def test_wheel_holds_only_the_tiesfed_namespace(tmp_path):
    """`pip install tiesfed` must put nothing but `tiesfed` at the top of site-packages."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = tmp_path.glob("tiesfed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tiesfed"}
    # the contract travels with the code: the .proto and the generated stubs
    assert "tiesfed/protos/v1/tiesfed.proto" in names
    assert "tiesfed/protos/v1/tiesfed_pb2_grpc.py" in names
