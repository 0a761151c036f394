"""Group ``denoiser/``'s modules into the sub-packages of the layout (issue 28),
and rewrite every reference to their old names across the repository.

What it does, in order:

1. relative imports inside ``denoiser/`` that would break (the importing
   module moves, or the module it names does) become absolute;
2. each module of :data:`MODULES` is ``git mv``-ed to its package (a
   ``denoiser/folder.py`` module first becomes ``denoiser/folder/__init__.py``,
   so that the folder work has a package whether or not the folder split has
   been merged);
3. each package of :data:`PACKAGES` gets an ``__init__.py`` whose docstring
   says what it holds and what it may import (an existing package keeps its
   docstring, with its ``May import:`` line set from the table);
4. every text file git knows (Python, Markdown, TOML, YAML, shell...) has its
   old names rewritten: ``import denoiser.x``, ``from denoiser.x import``,
   ``from denoiser import x`` (split when its names now live in several
   packages), dotted strings (monkeypatch targets, loggers, ``python -m``,
   docs) and paths (``denoiser/x.py``; ``denoiser/folder.py`` in prose is left
   to the folder split, which says where its parts went);
5. ``ruff`` sorts the imports and formats the Python files it changed.

It is idempotent: a second run, after more branches using the old names are
merged, rewrites what is left and moves nothing twice (a module found at both
its old and its new place is reported, not overwritten). Modules of
``denoiser/`` that the layout does not place are listed at the end, and
``tests/test_layout.py`` fails until they have a place here.

Run from the repository's root: ``python tools/move_modules.py`` (``--dry-run``
lists the moves without touching anything).
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

#: the packages, bottom up: (name, what it holds, the packages it may import).
#: ``config`` and ``request`` are modules left at the top of ``denoiser/``:
#: they are nodes of the graph like the packages.
PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "core": (
        "The leaves every part may use: the errors, fault points, atomic files and\n"
        "store paths, signal holding, image metrics, the model card and recipe, and\n"
        "the catalog of registered datasets (what the configs check names against),\n"
        "what the CPU can compute, and the opponent colour planes.",
        (),
    ),
    "imaging": (
        "One image at a time: decoding and encoding image files, cutting images into\n"
        "tiles and blending them back, small PNG renderings of batches.",
        ("core",),
    ),
    "nets": (
        "The networks: the architectures and the model factory (building, saving and\n"
        "safely loading Keras models). Keras is imported inside the functions.",
        ("core",),
    ),
    "config": ("The typed configs of the stages (a module).", ("core", "nets")),
    "data": (
        "The data a model learns from: downloads, the IDX and image-folder datasets,\n"
        "their splits, the noise, the shard sets and training-time augmentation.",
        ("core", "imaging", "config"),
    ),
    "folder": (
        "Folder work: a folder run (scan, journal, pipeline), the local or\n"
        "object-storage trees it reads and writes, the routing of each image to a\n"
        "model, and the run's report.",
        ("core", "imaging"),
    ),
    "runtimes": (
        "Running a trained model: Keras and OpenVINO, which runtime a run uses,\n"
        "and inference over arrays of any size in fixed-size batches.",
        ("core", "imaging", "nets", "data", "folder"),
    ),
    "domains": (
        "The domains (digits, grey and colour photographs).",
        ("core", "imaging", "nets", "config", "data", "folder", "runtimes"),
    ),
    "learning": (
        "Learning and judging a model: training, its checkpoints, losses and\n"
        "progress, evaluation and the quality gate.",
        ("core", "imaging", "nets", "config", "data", "folder", "runtimes", "domains"),
    ),
    "request": (
        "The one resolved request of a training run (a module).",
        ("core", "nets", "config", "data", "domains"),
    ),
}
#: the parts that stay modules at the top of ``denoiser/``
TOP_MODULES = ("config", "request")

#: old module (under ``denoiser``) -> its new dotted place (under ``denoiser``)
MODULES: dict[str, str] = {
    # core
    "errors": "core.errors",
    "faults": "core.faults",
    "files": "core.files",
    "interrupts": "core.interrupts",
    "metrics": "core.metrics",
    "cards": "core.cards",
    "catalog": "core.catalog",
    "cpu": "core.cpu",
    "opponent": "core.opponent",
    # imaging
    "images": "imaging.images",
    "tiling": "imaging.tiling",
    "plots": "imaging.plots",
    # nets
    "architectures": "nets.architectures",
    "models": "nets.models",
    # data
    "downloads": "data.downloads",
    "datasets": "data.datasets",
    "image_datasets": "data.image_datasets",
    "splits": "data.splits",
    "shards": "data.shards",
    "noise": "data.noise",
    "augment": "data.augment",
    # folder work (the package ``denoiser/folder/`` itself stays where it is)
    "trees": "folder.trees",
    "routing": "folder.routing",
    "report": "folder.run_report",
    # runtimes
    "runtime": "runtimes.runtime",
    "openvino_runtime": "runtimes.openvino_runtime",
    "inference": "runtimes.inference",
    # learning
    "training": "learning.training",
    "checkpoints": "learning.checkpoints",
    "losses": "learning.losses",
    "progress": "learning.progress",
    "evaluation": "learning.evaluation",
    "quality": "learning.quality",
}

ROOT_DOC_MARK = "The parts, bottom up"
#: the paragraph of a package's docstring that says what it may import
MAY_IMPORT = re.compile(r"^May import\b[^\n]*(?:\n[^\n]+)*", re.M)

#: files never rewritten: this tool names the old modules on purpose
SKIP_FILES = {"tools/move_modules.py"}
SKIP_DIRS = ("artifacts/builtin_models/",)
TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".toml",
    ".yaml",
    ".yml",
    ".cfg",
    ".ini",
    ".txt",
    ".sh",
    ".json",
    "",
}


def may_import_line(package: str) -> str:
    """The docstring line stating a package's allowed imports (from the table)."""
    allowed = PACKAGES[package][1]
    if not allowed:
        return "May import: nothing of denoiser outside this package."
    names = ", ".join(f"``denoiser.{p}``" for p in allowed)
    return textwrap.fill(f"May import: {names} (and itself).", width=88, break_on_hyphens=False)


def package_docstring(package: str) -> str:
    return f'"""{PACKAGES[package][0]}\n\n{may_import_line(package)}\n"""\n'


# -- rewriting text ---------------------------------------------------------------------------


def _dotted_pattern() -> re.Pattern:
    names = "|".join(sorted(MODULES, key=len, reverse=True))
    return re.compile(rf"(?<![\w.])denoiser\.({names})\b")


def _path_pattern() -> re.Pattern:
    names = "|".join(sorted(MODULES, key=len, reverse=True))
    return re.compile(rf"(?<![\w.-])denoiser/({names})\.py\b")


DOTTED = _dotted_pattern()
PATHS = _path_pattern()


def _new_path(name: str) -> str:
    return "denoiser/" + MODULES[name].replace(".", "/") + ".py"


def rewrite_text(text: str) -> str:
    """Old dotted names and old paths in any text, as the new ones."""
    text = DOTTED.sub(lambda m: "denoiser." + MODULES[m.group(1)], text)
    return PATHS.sub(lambda m: _new_path(m.group(1)), text)


def _statement_span(lines: list[str], node: ast.stmt) -> tuple[int, int]:
    """(start, end) offsets of a statement in the text the lines join to."""
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:
        # ast columns are utf-8 byte offsets
        line = lines[lineno - 1]
        return starts[lineno - 1] + len(line.encode()[:col].decode(errors="ignore"))

    return offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)


def _alias(name: str, asname: str | None) -> str:
    return f"{name} as {asname}" if asname else name


def rewrite_from_denoiser(text: str) -> str:
    """``from denoiser import x, y`` with moved modules among the names, as one
    statement per package the names now live in (the bound names unchanged)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    edits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0):
            continue
        if node.module != "denoiser" or not any(a.name in MODULES for a in node.names):
            continue
        groups: dict[str, list[str]] = {}
        for a in node.names:
            if a.name in MODULES:
                package, _, leaf = ("denoiser." + MODULES[a.name]).rpartition(".")
                bound = a.asname or (a.name if leaf != a.name else None)
                groups.setdefault(package, []).append(_alias(leaf, bound))
            else:
                groups.setdefault("denoiser", []).append(_alias(a.name, a.asname))
        statements = [f"from {pkg} import {', '.join(names)}" for pkg, names in groups.items()]
        edits.append((node, statements))
    if not edits:
        return text
    lines = text.splitlines(keepends=True)
    for node, statements in sorted(edits, key=lambda e: e[0].lineno, reverse=True):
        start, end = _statement_span(lines, node)
        line_start = text.rfind("\n", 0, start) + 1
        prefix = text[line_start:start]
        joiner = "\n" + prefix if prefix.strip() == "" else "; "
        text = text[:start] + joiner.join(statements) + text[end:]
        lines = text.splitlines(keepends=True)
    return text


FROM_DENOISER_LINE = re.compile(
    r"^(?P<indent>[ \t]*)from denoiser import (?P<names>\w+(?: as \w+)?(?:, *\w+(?: as \w+)?)*)"
    r"[ \t]*$",
    re.M,
)


def rewrite_from_denoiser_lines(text: str) -> str:
    """The same for whole-line ``from denoiser import x`` outside Python's
    syntax tree: in the strings of a script a test runs, in docs' examples."""

    def replace(m: re.Match) -> str:
        names = [n.strip() for n in m.group("names").split(",")]
        if not any(n.split(" as ")[0] in MODULES for n in names):
            return m.group(0)
        groups: dict[str, list[str]] = {}
        for n in names:
            name, _, asname = n.partition(" as ")
            if name in MODULES:
                package, _, leaf = ("denoiser." + MODULES[name]).rpartition(".")
                bound = asname or (name if leaf != name else None)
                groups.setdefault(package, []).append(_alias(leaf, bound))
            else:
                groups.setdefault("denoiser", []).append(_alias(name, asname or None))
        indent = m.group("indent")
        return "\n".join(f"{indent}from {p} import {', '.join(ns)}" for p, ns in groups.items())

    return FROM_DENOISER_LINE.sub(replace, text)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _old_module_moves(module: str) -> bool:
    """Whether the dotted ``module`` (or the module it lives in) is an old name that moves."""
    parts = module.split(".")
    return len(parts) >= 2 and parts[0] == "denoiser" and parts[1] in MODULES


def absolutise_relative_imports(root: Path, path: Path, moving: bool) -> str | None:
    """The file's text with the relative imports that a move would break made
    absolute (all of them when the file itself moves); None when none change."""
    text = path.read_text()
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    module = module_name(root, path)
    is_package = path.name == "__init__.py"
    edits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
        if moving or any(_old_module_moves(t) for t in targets):
            names = ", ".join(_alias(a.name, a.asname) for a in node.names)
            edits.append((node, f"from {base} import {names}"))
    if not edits:
        return None
    lines = text.splitlines(keepends=True)
    for node, statement in sorted(edits, key=lambda e: e[0].lineno, reverse=True):
        start, end = _statement_span(lines, node)
        text = text[:start] + statement + text[end:]
        lines = text.splitlines(keepends=True)
    return text


# -- moving -----------------------------------------------------------------------------------


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout


def plan_moves(root: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """The moves still to make and the conflicts (a module at both places)."""
    pkg = root / "denoiser"
    moves: list[tuple[Path, Path]] = []
    conflicts: list[str] = []
    folder_module, folder_init = pkg / "folder.py", pkg / "folder" / "__init__.py"
    if folder_module.exists():
        if folder_init.exists():
            conflicts.append("denoiser/folder.py and denoiser/folder/__init__.py both exist")
        else:
            moves.append((folder_module, folder_init))
    for old, new in MODULES.items():
        src, dst = pkg / f"{old}.py", pkg / (new.replace(".", "/") + ".py")
        if src.exists() and dst.exists():
            conflicts.append(f"{src.relative_to(root)} and {dst.relative_to(root)} both exist")
        elif src.exists():
            moves.append((src, dst))
    return moves, conflicts


def write_package_inits(root: Path) -> list[Path]:
    """Each package's ``__init__.py``: created with its docstring, or its
    existing docstring given the table's ``May import:`` line."""
    changed = []
    for package in PACKAGES:
        if package in TOP_MODULES:
            continue
        init = root / "denoiser" / package / "__init__.py"
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text(package_docstring(package))
            changed.append(init)
            continue
        text = init.read_text()
        new = set_may_import(text, may_import_line(package))
        if new != text:
            init.write_text(new)
            changed.append(init)
    return changed


DOC_SOURCE = re.compile(r"^([rRuU]?)(\"\"\"|\'\'\')(.*)\2$", re.S)


def _replace_docstring(text: str, edit) -> str:
    """The module's text with its docstring's body replaced by ``edit(body)``."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    start, end = _statement_span(lines, tree.body[0])
    quoted = DOC_SOURCE.match(text[start:end])
    if quoted is None:
        raise ValueError("the module docstring is not one triple-quoted string")
    prefix, quote, body = quoted.groups()
    return text[:start] + prefix + quote + edit(body) + quote + text[end:]


def _has_docstring(text: str) -> bool:
    tree = ast.parse(text)
    return bool(tree.body) and ast.get_docstring(tree, clean=False) is not None


def set_may_import(text: str, line: str) -> str:
    """The module's text with its docstring's ``May import:`` paragraph set to ``line``."""
    if not _has_docstring(text):
        return f'"""{line}\n"""\n\n' + text

    def edit(body: str) -> str:
        if MAY_IMPORT.search(body):
            return MAY_IMPORT.sub(line, body, count=1)
        return body.rstrip() + "\n\n" + line + "\n"

    return _replace_docstring(text, edit)


def write_root_docstring(root: Path) -> bool:
    """``denoiser/__init__.py``'s docstring ends with the parts, bottom up."""
    init = root / "denoiser" / "__init__.py"
    text = init.read_text()
    parts = "\n".join(
        textwrap.fill(
            f"- ``{name}``: {' '.join(PACKAGES[name][0].split())}",
            width=88,
            subsequent_indent="  ",
            break_on_hyphens=False,
        )
        for name in PACKAGES
    )

    def edit(body: str) -> str:
        if ROOT_DOC_MARK in body:
            body = body[: body.index(ROOT_DOC_MARK)]
        return (
            body.rstrip()
            + f"\n\n{ROOT_DOC_MARK} (each may import only the parts its docstring\n"
            + "names; ``tests/test_layout.py`` checks):\n\n"
            + parts
            + "\n"
        )

    new = _replace_docstring(text, edit) if _has_docstring(text) else text
    if new == text:
        return False
    init.write_text(new)
    return True


def text_files(root: Path) -> list[Path]:
    listed = git(root, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    files = []
    for rel in sorted(set(filter(None, listed.split("\0")))):
        if rel in SKIP_FILES or rel.startswith(SKIP_DIRS):
            continue
        path = root / rel
        if path.is_file() and not path.is_symlink() and path.suffix in TEXT_SUFFIXES:
            files.append(path)
    return files


def unplaced_modules(root: Path) -> list[str]:
    """Modules of ``denoiser/`` outside every package of the layout."""
    pkg = root / "denoiser"
    homes = {p for p in PACKAGES if p not in TOP_MODULES}
    out = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if len(rel.parts) == 1:
            if rel.stem not in (*TOP_MODULES, "__init__"):
                out.append(str(path.relative_to(root)))
        elif rel.parts[0] not in homes:
            out.append(str(path.relative_to(root)))
    return out


def apply_layout(root: Path, moves: list[tuple[Path, Path]]) -> set[Path]:
    """The moves made and every reference rewritten; the files changed."""
    changed: set[Path] = set()
    # 1. relative imports a move would break become absolute, while every file is still in place
    moving = {src for src, _ in moves}
    for path in sorted((root / "denoiser").rglob("*.py")):
        text = absolutise_relative_imports(root, path, path in moving)
        if text is not None:
            path.write_text(text)
            changed.add(path)
    # 2. the moves (the folder module first: the folder work's package must exist before its parts)
    for src, dst in moves:
        dst.parent.mkdir(parents=True, exist_ok=True)
        git(root, "mv", str(src.relative_to(root)), str(dst.relative_to(root)))
        print(f"moved {src.relative_to(root)} -> {dst.relative_to(root)}")
        changed = {dst if p == src else p for p in changed}
    # 3. the packages' docstrings
    for init in write_package_inits(root):
        print(f"wrote {init.relative_to(root)}")
        changed.add(init)
    if write_root_docstring(root):
        changed.add(root / "denoiser" / "__init__.py")
    # 4. every old name in every text file
    for path in text_files(root):
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        new = rewrite_from_denoiser(text) if path.suffix == ".py" else text
        new = rewrite_text(rewrite_from_denoiser_lines(new))
        if new != text:
            path.write_text(new)
            changed.add(path)
    return changed


def format_changed(root: Path, changed: set[Path]) -> None:
    """The changed files' imports sorted and formatted as the house does."""
    rewritten = sorted(str(p.relative_to(root)) for p in changed)
    print(f"rewrote {len(rewritten)} files")
    # 5. the imports sorted and formatted as the house does
    python = [p for p in rewritten if p.endswith(".py")]
    ruff = shutil.which("ruff")
    if python and ruff:
        subprocess.run([ruff, "check", "--fix", "--select", "I", "-q", *python], cwd=root)
        subprocess.run([ruff, "format", "-q", *python], cwd=root)
    elif python:
        print("move_modules: ruff not found: run `ruff check --fix --select I . && ruff format .`")
    pyproject = (root / "pyproject.toml").read_text()
    if '"denoiser*"' not in pyproject:
        print("move_modules: pyproject's package discovery does not name denoiser* (sub-packages)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--dry-run", action="store_true", help="list the moves, change nothing")
    args = parser.parse_args(argv)
    root = args.root.resolve()

    moves, conflicts = plan_moves(root)
    if conflicts:
        for c in conflicts:
            print(f"move_modules: conflict: {c} (merge them by hand, then run again)")
        return 2
    if args.dry_run:
        for src, dst in moves:
            print(f"git mv {src.relative_to(root)} {dst.relative_to(root)}")
        return 0

    changed = apply_layout(root, moves)
    format_changed(root, changed)
    leftovers = unplaced_modules(root)
    for rel in leftovers:
        print(f"move_modules: not placed by the layout: {rel} (add it to MODULES)")
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
