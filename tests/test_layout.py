"""The layout of ``denoiser/`` (issue 28): every module sits in the part the
layout gives it, and no module imports a part its own part may not import
(function-local imports included), so the parts form a graph without circles.

The layout is the table of ``tools/move_modules.py`` (``PACKAGES``, ``MODULES``,
``TOP_MODULES``), the tool that made it; each package's docstring states the
same ``May import:`` line. Reads the source as text (``ast``); only the last
test imports modules, those ``bench/`` and ``tools/`` name.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_layout():
    spec = importlib.util.spec_from_file_location("move_modules", REPO / "tools/move_modules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LAYOUT = load_layout()


def part_of(dotted: str) -> str | None:
    """The part of the library a dotted module name belongs to (its package,
    or a top module), ``""`` for ``denoiser`` itself, None outside it."""
    parts = dotted.split(".")
    if parts[0] != "denoiser":
        return None
    return parts[1] if len(parts) > 1 else ""


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, at any depth
    (``from pkg import name`` gives ``pkg.name``: a module or a name in ``pkg``)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            if base == "denoiser":
                found += [(node.lineno, f"denoiser.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, base))
    return found


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layout_violations(root: Path, allowed: dict[str, tuple[str, ...]]) -> list[str]:
    """Each import of the library's code from a part its part may not import,
    as ``file:line: part -> part (name)``."""
    violations = []
    for path in sorted((root / "denoiser").rglob("*.py")):
        module = module_name(root, path)
        own = part_of(module)
        for line, name in imported_modules(path, module):
            target = part_of(name)
            if target is None or target in ("", own) or own == "":
                continue
            if own not in allowed or target not in allowed[own]:
                rel = path.relative_to(root)
                violations.append(f"{rel}:{line}: {own} -> {target} ({name})")
    return violations


def unplaced_modules(root: Path) -> list[str]:
    """Modules of ``denoiser/`` in no part of the layout."""
    homes = set(LAYOUT.PACKAGES) - set(LAYOUT.TOP_MODULES)
    out = []
    for path in sorted((root / "denoiser").rglob("*.py")):
        rel = path.relative_to(root / "denoiser")
        top_module = len(rel.parts) == 1 and rel.stem in (*LAYOUT.TOP_MODULES, "__init__")
        if not top_module and not (len(rel.parts) > 1 and rel.parts[0] in homes):
            out.append(rel.as_posix())
    return out


def allowed_table() -> dict[str, tuple[str, ...]]:
    return {name: allowed for name, (_, allowed) in LAYOUT.PACKAGES.items()}


def test_every_module_sits_in_the_part_the_layout_gives_it():
    pkg = REPO / "denoiser"
    misplaced = [
        f"denoiser/{old}.py (belongs at denoiser/{new.replace('.', '/')}.py)"
        for old, new in LAYOUT.MODULES.items()
        if (pkg / f"{old}.py").exists() or not (pkg / (new.replace(".", "/") + ".py")).exists()
    ]
    assert not misplaced, "run tools/move_modules.py: " + ", ".join(misplaced)
    assert not (pkg / "folder.py").exists() and (pkg / "folder" / "__init__.py").is_file()
    for name in LAYOUT.PACKAGES:
        if name in LAYOUT.TOP_MODULES:
            assert (pkg / f"{name}.py").is_file(), name
        else:
            assert (pkg / name / "__init__.py").is_file(), name
    assert unplaced_modules(REPO) == [], "give these a part in tools/move_modules.py"


def test_the_parts_may_import_only_parts_below_them():
    """The rule table is a graph without circles: an order exists in which
    every part comes after all the parts it may import."""
    table = allowed_table()
    placed: list[str] = []
    remaining = dict(table)
    while remaining:
        ready = [n for n, allowed in remaining.items() if set(allowed) <= set(placed)]
        assert ready, f"a circle among {sorted(remaining)}"
        placed += ready
        for n in ready:
            del remaining[n]
    assert placed[0] == "core" and table["core"] == ()
    assert all(a in table for allowed in table.values() for a in allowed)


def test_each_package_says_what_it_may_import():
    for name in LAYOUT.PACKAGES:
        if name in LAYOUT.TOP_MODULES:
            continue
        init = REPO / "denoiser" / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert " ".join(LAYOUT.may_import_line(name).split()) in " ".join(doc.split()), name


def test_no_module_imports_a_part_its_part_may_not():
    assert layout_violations(REPO, allowed_table()) == []


def test_an_import_against_the_table_is_reported(tmp_path):
    """The check itself: a leaf part importing the training, at module level
    and inside a function, and a relative import across parts, are found."""
    core, learning = tmp_path / "denoiser" / "core", tmp_path / "denoiser" / "learning"
    core.mkdir(parents=True)
    learning.mkdir()
    for folder in (tmp_path / "denoiser", core, learning):
        (folder / "__init__.py").write_text('"""A part."""\n')
    (learning / "training.py").write_text("from denoiser.core import errors\n")
    (core / "errors.py").write_text(
        "import numpy\n"
        "from denoiser.learning.training import train_model\n\n\n"
        "def f():\n"
        "    from denoiser.learning import training\n\n"
        "    from ..learning.training import x\n"
    )
    found = layout_violations(tmp_path, {"core": (), "learning": ("core",)})
    assert found == [
        "denoiser/core/errors.py:2: core -> learning (denoiser.learning.training)",
        "denoiser/core/errors.py:6: core -> learning (denoiser.learning)",
        "denoiser/core/errors.py:8: core -> learning (denoiser.learning.training)",
    ]


def test_the_benchmarks_and_tools_import_only_names_that_exist():
    """A module moved or a name renamed is caught in ``bench/`` and ``tools/``
    too, which no other test imports (their project imports are function-local)."""
    missing = []
    for path in sorted((REPO / "bench").glob("*.py")) + sorted((REPO / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.module.split(".")[0] not in ("denoiser", "artifacts", "tasks", "flows"):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                if importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    assert missing == []
