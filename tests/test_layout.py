"""
Layout rules that keep the code base navigable: scripts are leaves (they import the library, never each other).
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def imported_modules(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            if node.module == "scripts":  # from scripts import base_train
                yield from (f"scripts.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            yield "scripts." + (node.module or "")  # a relative import inside scripts/ reaches another script


def test_scripts_never_import_scripts():
    scripts = sorted((REPO / "scripts").glob("*.py"))
    assert scripts, "no scripts found"
    offenders = [f"{path.name}: imports {name}" for path in scripts for name in imported_modules(path)
                 if name == "scripts" or name.startswith("scripts.")]
    assert not offenders, "scripts must not import other scripts (move shared code into nanochat/ or tasks/):\n" + \
        "\n".join(offenders)
