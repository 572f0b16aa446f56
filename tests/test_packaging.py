"""How wattgate installs: one namespace, and a meter that stands on its own."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_distribution_installs_no_top_level_meter_or_proxy(tmp_path):
    # Run outside the repo: there, its own wattgate.egg-info would answer instead of the install.
    code = (
        "import importlib.metadata as m\n"
        "print(' '.join(sorted({f.parts[0] for f in m.distribution('wattgate').files or [] if f.suffix == '.py'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    tops = set(out.stdout.split())
    assert not tops & {"meter", "proxy"}, tops


def test_the_packages_import_under_the_wattgate_namespace_from_outside_the_repo(tmp_path):
    # Outside the repo the root folders are not on the path: only the installed namespace is.
    code = "import wattgate.meter, wattgate.proxy.cli; print(wattgate.meter.Meter.__module__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "wattgate.meter.meter"


def test_the_chat_page_ships_in_the_package(tmp_path):
    code = "from wattgate.proxy.page import static_files; print(' '.join(sorted(static_files())))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["/chat", "/chat/chat.css", "/chat/chat.js", "/chat/icon.svg", "/widget.js"]


def test_the_meter_imports_nothing_of_the_proxy():
    for path in (ROOT / "meter").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith(("wattgate.proxy", "proxy")) for n in names), (path, names)
