"""The house's figures (issue 28): import circles among the project's modules,
function-local imports of the project's own modules, functions over 80 lines,
cyclomatic complexity, store-resolution call sites, conditionals naming a
domain outside the domain modules, and duplicated code.

Run from a checkout: ``python bench/house_metrics.py`` (``--json`` for the
figures alone). It reads the source as text (``ast``), runs ``ruff`` and the
``duplicates`` tool; it imports none of the project.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("denoiser", "tasks", "flows", "artifacts")
LONG_FUNCTION = 80
COMPLEX = 15
#: the words of the domain split: a string or an identifier part naming a domain or its shards
DOMAIN_WORDS = {"photo", "photos", "digit", "digits", "patches", "pairs"}
#: a call that asks "photos or digits?" without naming either
DOMAIN_CALLS = {"is_image_dataset"}
#: heavy optional dependencies: a function-local import of these is by design
HEAVY = ("tensorflow", "keras", "openvino", "ai_edge_litert", "dask", "distributed", "s3fs")


def project_files(root: Path) -> list[Path]:
    """The product's Python files (the four packages; not tests, not bench)."""
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute module names an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([base] if base else []))
    # `from pkg import mod` names a module too: both are tried against the known modules
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _resolve(name: str, known: set[str]) -> str | None:
    """The project module ``name`` is (or lives in), None outside the project."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path) -> tuple[dict, dict, list]:
    """(all edges, top-level edges, function-local imports) between the project's modules."""
    files = {module_name(root, p): p for p in project_files(root)}
    known = set(files)
    everything: dict[str, set[str]] = defaultdict(set)
    top_level: dict[str, set[str]] = defaultdict(set)
    local: list[tuple[str, int, str]] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        in_function: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(fn):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        in_function.add(id(inner))
        type_checking: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        type_checking.add(id(inner))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in type_checking:
                continue
            targets = {_resolve(n, known) for n in _imported(node, module, is_package)}
            targets = {t for t in targets if t and t != module}
            # a package's own __init__ reached through `from pkg import mod` is not an edge
            targets = {t for t in targets if not module.startswith(t + ".")} or targets - {
                module.rpartition(".")[0]
            }
            everything[module] |= targets
            if id(node) in in_function:
                local.extend((module, node.lineno, t) for t in sorted(targets))
            else:
                top_level[module] |= targets
    return everything, top_level, local


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return sorted(found, key=len, reverse=True)


def long_functions(root: Path) -> list[tuple[str, str, int]]:
    """(file, function, lines) of every function longer than LONG_FUNCTION lines."""
    out = []
    for path in project_files(root):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > LONG_FUNCTION:
                    out.append((str(path.relative_to(root)), node.name, n))
    return sorted(out, key=lambda r: -r[2])


def complexity(root: Path) -> list[tuple[str, str, int]]:
    """(file, function, complexity) of every function above 10, from ruff's C901."""
    proc = subprocess.run(
        [
            "ruff",
            "check",
            "--select",
            "C901",
            "--config",
            "lint.mccabe.max-complexity = 10",
            "--output-format",
            "json",
            *PACKAGES,
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    out = []
    for d in json.loads(proc.stdout or "[]"):
        m = re.match(r"`(.+)` is too complex \((\d+) > \d+\)", d["message"])
        if m:
            out.append((str(Path(d["filename"]).relative_to(root)), m[1], int(m[2])))
    return sorted(out, key=lambda r: -r[2])


def store_sites(root: Path) -> dict[str, int]:
    """Call sites of ``Store.at`` and ``resolve_store_root`` per file."""
    sites: dict[str, int] = {}
    for path in project_files(root):
        tree = ast.parse(path.read_text())
        n = 0
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = ast.unparse(node.func)
                if f in ("Store.at", "resolve_store_root") or f.endswith(".resolve_store_root"):
                    n += 1
        if n:
            sites[str(path.relative_to(root))] = n
    return sites


def _words(text: str) -> set[str]:
    return set(re.split(r"[^a-z]+", text.lower()))


def _names_domain(expr: ast.AST) -> bool:
    for node in ast.walk(expr):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _words(node.value) & DOMAIN_WORDS:
                return True
        name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
        if isinstance(name, str) and (_words(name) & DOMAIN_WORDS or name in DOMAIN_CALLS):
            return True
    return False


def domain_conditionals(root: Path) -> list[tuple[str, int, str]]:
    """Conditionals (if, elif, x if c else y, while, comprehension filters,
    match cases) whose test names photos, digits or patches, outside
    ``denoiser/domains/``."""
    out = []
    for path in project_files(root):
        rel = str(path.relative_to(root))
        if rel.startswith("denoiser/domains/"):
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            tests = []
            if isinstance(node, ast.If | ast.IfExp | ast.While):
                tests = [node.test]
            elif isinstance(node, ast.comprehension):
                tests = list(node.ifs)
            elif isinstance(node, ast.match_case):
                tests = [node.pattern]
            for t in tests:
                if _names_domain(t):
                    out.append((rel, t.lineno, lines[t.lineno - 1].strip()))
    return sorted(set(out))


def duplicate_pairs(root: Path) -> tuple[int, list[str]]:
    """Pairs the ``duplicates`` tool lists with neither side in tests."""
    proc = subprocess.run(
        ["duplicates", "--most", "200", "--seconds", "120"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    rows = [ln.strip() for ln in proc.stdout.splitlines() if re.match(r"\s*D\d+ ", ln)]
    kept = [r for r in rows if "tests/" not in r]
    return len(kept), kept


def measure(root: Path) -> dict:
    everything, top_level, local = import_graph(root)
    project_local = [(m, ln, t) for m, ln, t in local]
    funcs = long_functions(root)
    cx = complexity(root)
    sites = store_sites(root)
    cond = domain_conditionals(root)
    dup_count, dups = duplicate_pairs(root)
    per_file_local: dict[str, int] = defaultdict(int)
    for m, _, _ in project_local:
        per_file_local[m] += 1
    return {
        "cycles_all_imports": cycles(everything),
        "cycles_top_level_imports": cycles(top_level),
        "function_local_project_imports": len(project_local),
        "function_local_by_module": dict(sorted(per_file_local.items(), key=lambda kv: -kv[1])),
        "functions_over_80": funcs,
        "complexity_max": cx[0][2] if cx else 0,
        "complexity_over_15": [r for r in cx if r[2] > COMPLEX],
        "store_call_sites": sum(sites.values()),
        "store_call_sites_by_file": sites,
        "domain_conditionals": cond,
        "duplicate_pairs_outside_tests": dup_count,
        "duplicates": dups,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the checkout to measure")
    parser.add_argument("--json", action="store_true", help="the figures as JSON")
    args = parser.parse_args()
    m = measure(Path(args.root).resolve())
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"import circles (all imports, incl. function-local): {len(m['cycles_all_imports'])}")
    for c in m["cycles_all_imports"]:
        print(f"  {len(c)} modules: {' '.join(c)}")
    print(f"import circles (module-level imports only): {len(m['cycles_top_level_imports'])}")
    for c in m["cycles_top_level_imports"]:
        print(f"  {len(c)} modules: {' '.join(c)}")
    print(f"function-local imports of project modules: {m['function_local_project_imports']}")
    for mod, n in list(m["function_local_by_module"].items())[:8]:
        print(f"  {n:4d} {mod}")
    print(f"functions over {LONG_FUNCTION} lines: {len(m['functions_over_80'])}")
    for f, name, n in m["functions_over_80"]:
        print(f"  {n:4d} {f}:{name}")
    print(
        f"highest complexity (C901): {m['complexity_max']}; "
        f"above {COMPLEX}: {len(m['complexity_over_15'])}"
    )
    for f, name, n in m["complexity_over_15"]:
        print(f"  {n:4d} {f}:{name}")
    print(f"Store.at / resolve_store_root call sites: {m['store_call_sites']}")
    for f, n in m["store_call_sites_by_file"].items():
        print(f"  {n:4d} {f}")
    print(
        f"conditionals naming photos/digits/patches outside domains: {len(m['domain_conditionals'])}"
    )
    for f, ln, text in m["domain_conditionals"]:
        print(f"  {f}:{ln}: {text}")
    print(f"duplicates pairs outside tests: {m['duplicate_pairs_outside_tests']}")
    for r in m["duplicates"]:
        print(f"  {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
