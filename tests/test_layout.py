"""The tree is the design: folders import only the folders below them, no import circle, argparse only in cli/,
short files and functions, every deferred import says why (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "edkm"

# top to bottom: a module may import edkm modules of its own folder and of the folders after it, never before
ORDER = [
    "cli",
    "bench",
    "jobs",
    "training",
    "peers",
    "coreml",
    "hf",
    "generation",
    "distributed",
    "export",
    "eval",
    "models",
    "data",
    "transform",
    "layers",
    "kernels",
    "memory",
    "config",
    "cluster",
    "ranks",
    "atomic",
    "rss",
]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path, ast.parse(path.read_text())


def module_names():
    return {name for name, _, _ in modules()}


def edkm_imports(name, path, tree, known=None):
    """(imported module, line) of every edkm import in the module, wherever it sits; ``from package import module``
    counts as an import of that module."""
    known = module_names() if known is None else known
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "edkm" or target.startswith("edkm."):
                yield target, node.lineno


def folder(module):
    """The ORDER entry of an edkm module ('edkm.layers.lut' -> 'layers'); None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


def test_every_folder_and_top_level_module_has_a_place_in_the_order():
    names = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").is_file()
    }
    assert names == set(ORDER), f"not in ORDER: {names - set(ORDER)}; gone: {set(ORDER) - names}"


def test_dependencies_run_one_way():
    upward = []
    for name, path, tree in modules():
        mine = folder(name)
        for target, line in edkm_imports(name, path, tree):
            theirs = folder(target)
            if mine is None or theirs is None or theirs == mine:
                continue
            if ORDER.index(theirs) < ORDER.index(mine):
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({mine}) imports {target} ({theirs})")
    assert not upward, "\n".join(upward)


def test_internal_modules_use_the_facade_only_for_the_version():
    found = []
    for name, path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "edkm" and not node.level and name != "edkm":
                found += [f"{path.relative_to(PACKAGE)}:{node.lineno}" for a in node.names if a.name != "__version__"]
            if isinstance(node, ast.Import) and any(a.name == "edkm" for a in node.names):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, f"import the module that defines the name, not the edkm facade: {found}"


def test_no_import_circle():
    graph = {}
    known = {name for name, _, _ in modules()}
    for name, path, tree in modules():
        graph[name] = {t for t, _ in edkm_imports(name, path, tree) if t in known and t != name}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node)


def test_the_cluster_math_imports_nothing_else_of_edkm():
    for name, path, tree in modules():
        if folder(name) == "cluster":
            others = [t for t, _ in edkm_imports(name, path, tree) if folder(t) != "cluster"]
            assert not others, f"{path.relative_to(PACKAGE)} imports {others}"


def test_argparse_only_in_the_command_line():
    users = [
        str(path.relative_to(PACKAGE))
        for name, path, tree in modules()
        if folder(name) != "cli"
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and "argparse" in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])
    ]
    assert not users, users


def test_short_files_and_functions():
    long = []
    for _, path, tree in modules():
        lines = path.read_text().count("\n")
        if lines > MAX_FILE_LINES:
            long.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_every_deferred_import_says_why():
    """An import inside a function defers a heavy or optional dependency on purpose: a `# deferred:` comment
    on the line above the function's first such import (or on the import line itself) says why."""
    silent = []
    for _, path, tree in modules():
        lines = path.read_text().splitlines()
        top = {id(n) for n in tree.body}
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            inner = sorted(
                n.lineno for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top
            )
            if inner:
                first = inner[0]
                said = "# deferred" in lines[first - 1] or any(
                    "# deferred" in lines[i] for i in range(max(0, first - 3), first - 1)
                )
                if not said:
                    silent.append(f"{path.relative_to(PACKAGE)}:{first} ({func.name})")
    assert not silent, "imports inside functions without a '# deferred:' reason:\n" + "\n".join(sorted(set(silent)))
