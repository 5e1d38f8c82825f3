"""The layout rules of docs/architecture.md, read from the source: no module-level caches, no
library module outside ``influence/models/`` (and the model base class's own module) reads a
private member of a model, and no import runs from a lower floor to a higher one."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "influence"

#: names a model goes by in the library's code
MODEL_NAMES = {"model", "m", "twin", "member", "net", "sub", "mdl", "fitted", "model_", "base_model", "low"}
#: attributes that hold a model
MODEL_ATTRS = {"model", "model_"}
MODEL_MODULES = ("influence/models/", "influence/generic_neural_net.py")

#: the floors, lowest first: a module may import from its own floor and the ones below
FLOORS = [
    ("influence.utils", "influence.validation", "influence.registry", "influence.parallel",
     "influence.process_group", "influence.datasets"),
    ("influence.model_kernels", "influence.curvature"),
    ("influence.solvers",),
    ("influence.result_store", "influence.generic_neural_net"),
    ("influence.estimators", "influence.index"),
    ("influence.facade",),
    ("influence.models",),
    ("influence.refit_validation", "influence.applications", "influence.evaluation", "influence.experiment",
     "influence.report", "influence.style"),
]


def library_files():
    return sorted(p for p in PKG.rglob("*.py"))


def rel(p):
    return p.relative_to(REPO).as_posix()


def module_name(p: Path) -> str:
    parts = list(p.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor_of(mod: str) -> int | None:
    best = None
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if mod == prefix or mod.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    return None if best is None else best[0]


def imports_of(p: Path):
    """``(line, imported module)`` for every import of the package in ``p`` (function-level too)."""
    mod = module_name(p)
    pkg = mod if p.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("influence"):
                continue
            for alias in node.names:  # `from .. import result_store` imports a module
                sub = f"{target}.{alias.name}"
                path = REPO / Path(*sub.split("."))
                yield node.lineno, (sub if path.with_suffix(".py").exists() or path.is_dir() else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("influence"):
                    yield node.lineno, alias.name


def test_every_library_module_has_a_floor():
    missing = [module_name(p) for p in library_files()
               if module_name(p) != "influence" and not module_name(p).endswith("__main__")
               and floor_of(module_name(p)) is None]
    assert not missing, missing


def test_no_import_runs_from_a_lower_floor_to_a_higher_one():
    bad = []
    for p in library_files():
        mod = module_name(p)
        if mod == "influence" or mod.endswith("__main__"):
            continue  # the package's lazy exports and the command-line entry sit above everything
        here = floor_of(mod)
        for line, target in imports_of(p):
            there = floor_of(target)
            if there is not None and there > here:
                bad.append(f"{rel(p)}:{line} ({mod}, floor {here}) imports {target} (floor {there})")
    assert not bad, "\n".join(bad)
    gnn = (PKG / "generic_neural_net.py").read_text()
    assert "shortcuts" not in gnn and "facade" not in [t.rsplit(".", 1)[-1] for _, t in
                                                       imports_of(PKG / "generic_neural_net.py")]


def _is_model_expr(node) -> bool:
    if isinstance(node, ast.Name):
        return node.id in MODEL_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in MODEL_ATTRS
    return False


def private_model_accesses(p: Path):
    for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and _is_model_expr(node.value):
            yield node.lineno, ast.unparse(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr",
                                                                                               "setattr") \
                and len(node.args) >= 2 and _is_model_expr(node.args[0]) and isinstance(node.args[1], ast.Constant) \
                and str(node.args[1].value).startswith("_"):
            yield node.lineno, ast.unparse(node)


def test_no_module_outside_the_models_reads_a_private_member_of_a_model():
    bad = []
    files = library_files() + sorted((REPO / "scripts").glob("*.py")) + sorted((REPO / "inception").glob("*.py"))
    for p in files:
        if rel(p).startswith(MODEL_MODULES):
            continue
        bad += [f"{rel(p)}:{line}: {text}" for line, text in private_model_accesses(p)]
    assert not bad, "\n".join(bad)


def test_the_ast_walk_finds_a_private_access():
    """The check above can fail: it flags the kinds of access it looks for."""
    probe = REPO / "tests" / "_probe_private_access.py"
    probe.write_text("def f(model, self):\n    model._forward(1)\n    self.model._kernels\n"
                     "    getattr(model, '_curvature_sum', None)\n    model.forward(1)\n")
    try:
        found = [text for _, text in private_model_accesses(probe)]
    finally:
        probe.unlink()
    assert len(found) == 3, found


def test_no_module_level_caches():
    """No module keeps a cache keyed by models or operators (each cache has an owner object)."""
    pattern = re.compile(r"_SHARED|WeakKeyDictionary|WeakValueDictionary|_WRITABLE|_INFLUENCES|_KERNELS\b|_LOOPS\b")
    bad = [f"{rel(p)}:{i}: {line.strip()}" for p in library_files()
           for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not bad, "\n".join(bad)
    # and no module-level mutable container is filled at run time by assignment into it
    for p in library_files():
        tree = ast.parse(p.read_text())
        top = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
               if isinstance(t, ast.Name) and isinstance(node.value, (ast.Dict, ast.Set, ast.Call))
               and not (isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") in
                        ("frozenset", "tuple", "Registry", "TypeVar", "getLogger"))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id in top:
                raise AssertionError(f"{rel(p)}:{node.lineno}: the module-level {node.value.id} is written at run "
                                     f"time")
