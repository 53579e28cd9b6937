"""The installed package: version from Cargo, curated public API, typing files."""

import importlib.metadata
import re
from pathlib import Path

import queue_dispatcher as qd
from queue_dispatcher import _native

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_the_cargo_workspace_version():
    cargo = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'\[workspace\.package\][^\[]*?version\s*=\s*"([^"]+)"', cargo, re.S)
    assert m, "workspace.package version not found"
    assert qd.__version__ == m.group(1)
    assert importlib.metadata.version("queue_dispatcher") == qd.__version__


def test_public_api_is_curated():
    for name in qd.__all__:
        assert hasattr(qd, name), name
    assert "WorkerPool" not in qd.__all__ and "Template" not in qd.__all__, "native internals stay private"
    assert qd.Error.__module__ == "queue_dispatcher"


def test_typing_files_ship_with_the_package():
    pkg = Path(qd.__file__).parent
    assert (pkg / "py.typed").exists()
    stub = (pkg / "_native.pyi").read_text()
    for name in _native.__all__:
        assert re.search(rf"\b{re.escape(name)}\b", stub), f"{name} missing from _native.pyi"
