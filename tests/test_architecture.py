"""The package's structure, read with `ast` (nothing is imported, so an import hidden in a function counts too):

- the layers below import downwards only (a module may import its own layer or a lower one), with no cycle;
- every JSON file is written through `lorasens.safeio` (standard JSON, atomic), never with `json.dump` directly;
- every run-folder file name is spelled in `lorasens.rundir.files` only;
- no dataset name appears in a conditional outside `lorasens.data` (a dataset's behaviour lives in its module).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lorasens"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (`from a.b import c` counts a.b.c if it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    graph = {}
    for name, path in paths.items():
        targets = imports_of(path, known)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too, except to the packages that
        # contain the importing module (they are already being imported when it runs).
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for target in list(targets):
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in known}
        graph[name] = targets - {name} - own
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_real_imports():
    graph = import_graph()
    assert "lorasens.rundir.files" in graph["lorasens.presentation.report"]
    assert "lorasens.training.context" in graph["lorasens.experiment.run"]
    assert "lorasens.metrics" in graph["lorasens.data.e2e"]


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_package_modules():
    assert find_cycle(import_graph()) is None


def test_analysis_and_evaluation_do_not_import_the_orchestrator():
    graph = import_graph()
    offenders = [m for m, targets in graph.items()
                 if m.startswith(("lorasens.analysis", "lorasens.evaluation"))
                 and "lorasens.experiment.run" in targets]
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------------
# Layers, bottom first. A module belongs to the longest prefix listed for it; every module must have one (a new
# module is placed here on purpose). data/registry.py and data/files.py sit below config: the config checks a
# dataset name against the registry; the dataset modules themselves (which read config) sit above it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("errors", "safeio", "signals", "presets", "model", "metrics", "rundir", "rundir.files",
                    "rundir.lock", "rundir.metrics")),
    ("dataset registry", ("data", "data.registry", "data.files", "data.hub", "data.sql", "data.sql_metrics")),
    ("config", ("config",)),
    ("datasets and run loading", ("data.custom", "data.e2e", "data.mnli", "data.samsum", "data.synthetic",
                                  "data.wikisql", "data.features", "data.templates", "data.prepare",
                                  "rundir.load")),
    ("training", ("training",)),
    ("analysis and evaluation", ("analysis", "evaluation")),
    ("presentation", ("presentation",)),
    ("experiment", ("experiment",)),
    ("interface", ("commands", "cli", "__main__", "")),
)


def layer_of(module: str) -> int | None:
    """Index in LAYERS of `module` (lorasens.x.y), by the longest listed prefix."""
    short = module.removeprefix("lorasens").removeprefix(".")
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = short == prefix or (prefix and short.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if layer_of(m) is None] == []


def test_layer_of_uses_the_longest_prefix():
    assert LAYERS[layer_of("lorasens.data.registry")][0] == "dataset registry"
    assert LAYERS[layer_of("lorasens.data.mnli")][0] == "datasets and run loading"
    assert LAYERS[layer_of("lorasens.analysis.post")][0] == "analysis and evaluation"
    assert LAYERS[layer_of("lorasens")][0] == "interface"


def test_imports_run_downwards_only():
    graph = import_graph()
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
                    for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))
    assert upward == []


def python_files():
    return sorted(PACKAGE.rglob("*.py"))


def calls(tree: ast.AST, module: str, name: str):
    """Calls of `module.name(...)` (as `json.dump(...)`)."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def test_json_is_written_through_safeio_only():
    """No `json.dump` outside safeio, and no `json.dumps` text written to a file (`.write(...)`/`.write_text(...)`)."""
    offenders = []
    for path in python_files():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "safeio.py":
            continue
        tree = ast.parse(path.read_text())
        offenders += [f"{rel}:{c.lineno} json.dump" for c in calls(tree, "json", "dump")]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("write", "write_text", "writelines")):
                offenders += [f"{rel}:{c.lineno} json.dumps written to a file" for arg in node.args
                              for c in calls(arg, "json", "dumps")]
    assert offenders == []


def test_run_file_names_are_spelled_in_rundir_only():
    from lorasens.rundir import files

    # "validation" is also a split name and "recorded_by" a key: not file names anywhere else.
    names = {v for k, v in vars(files).items() if k.isupper() and isinstance(v, str)} - {"validation", "recorded_by"}
    offenders = []
    for path in python_files():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("rundir/"):
            continue
        offenders += [f"{rel}:{node.lineno} {node.value!r}" for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, ast.Constant) and node.value in names]
    assert offenders == []


def conditions(tree: ast.AST):
    """Every expression that decides a branch: if/while/assert/ternary tests, comprehension filters, comparisons,
    match patterns and `startswith`/`endswith` calls."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            yield node.test
        elif isinstance(node, ast.comprehension):
            yield from node.ifs
        elif isinstance(node, (ast.Compare, ast.match_case)):
            yield node
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "endswith"):
            yield node


def test_no_dataset_name_in_a_conditional_outside_data():
    from lorasens.data.registry import registered_datasets

    names = set(registered_datasets())
    assert {"e2e", "mnli", "custom"} <= names
    offenders = []
    for path in python_files():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("data/"):
            continue
        for condition in conditions(ast.parse(path.read_text())):
            offenders += [f"{rel}:{n.lineno} {n.value!r}" for n in ast.walk(condition)
                          if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.lower() in names]
    assert offenders == []


def test_the_checks_find_planted_offenders():
    planted = ast.parse('if cfg.data.dataset == "mnli":\n    Path("x").write_text(json.dumps(v))\njson.dump(v, f)')
    assert [c.lineno for c in calls(planted, "json", "dump")] == [3]
    assert any(isinstance(n, ast.Constant) and n.value == "mnli" for c in conditions(planted) for n in ast.walk(c))


MAX_FUNCTION_LINES = 80


def test_no_function_longer_than_80_lines():
    """Long functions are split into named stages (the orchestrator reads as the experiment's steps)."""
    long = [f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in python_files() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_summary_head_is_built_in_one_place():
    """`lorasens train` and SensitivityCallback build the summary's common keys through lifecycle.summary_head."""
    keys = {"final_model_from", "final_train_loss", "best_eval_loss"}
    builders = sorted({path.relative_to(PACKAGE).as_posix() for path in python_files()
                       for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Dict)
                       and keys & {k.value for k in node.keys if isinstance(k, ast.Constant)}})
    assert builders == ["experiment/lifecycle.py"]
