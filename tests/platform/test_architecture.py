"""The house's floors, read from the imports (ast: nothing is imported or run).

- no import circle among our modules (a lazy import inside a function is an arrow too; only
  imports under ``if TYPE_CHECKING:`` are left out);
- selectors never import services (reads below writes);
- ``tuneplex.core`` is the bottom floor: it imports no app of ours above it;
- ``jobs/`` is the Celery face: it reaches the platform only from the task bodies, each of which
  is one call into one platform entry point, with the task's own arguments.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("platform", "jobs", "serving", "frontend")
# What tuneplex.core may import of ours: itself, the Celery app it enqueues through by task name,
# and the Django-free libraries below the platform.
CORE_MAY_IMPORT = ("tuneplex.core", "jobs.celery", "jobs.training", "serving")


def _modules() -> dict[str, Path]:
    found = {}
    for top in TOPS:
        for path in (ROOT / top).rglob("*.py"):
            relative = path.relative_to(ROOT)
            if "migrations" in relative.parts or "tests" in relative.parts:
                continue
            parts = relative.with_suffix("").parts
            name = ".".join(parts[1:] if parts[0] == "platform" else parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _type_checking_only(tree: ast.AST) -> set[int]:
    return {id(node) for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.dump(branch.test)
            for statement in branch.body for node in ast.walk(statement)}


def _imported(node: ast.AST) -> set[str]:
    """The dotted names an import statement may bind (a module, or a name in a module)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    return set()


def _ours(names: set[str]) -> set[str]:
    """The modules of ours among ``names`` (``a.b.c`` where ``a.b.c`` is a module of ours)."""
    return {name for name in names if name in MODULES}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    return _ours({name for node in ast.walk(tree) if id(node) not in skipped
                  for name in _imported(node)})


EDGES = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _is_services(name: str) -> bool:
    return "services" in name.split(".")


def test_the_reader_finds_our_modules_and_their_imports():
    # The positive control for the rules below: they would pass on an empty map.
    assert len(MODULES) > 100
    assert "tuneplex.core.errors" in EDGES["tuneplex.files.services"]
    assert "jobs.celery" in EDGES["jobs.tasks"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_among_our_modules():
    assert circles(EDGES) == []


def test_selectors_never_import_services():
    offenders = [f"{name} imports {target}" for name, targets in sorted(EDGES.items())
                 if name.split(".")[-1] == "selectors"
                 for target in sorted(targets) if _is_services(target)]
    assert offenders == []


def test_core_imports_nothing_of_ours_above_it():
    offenders = [f"{name} imports {target}" for name, targets in sorted(EDGES.items())
                 if name == "tuneplex.core" or name.startswith("tuneplex.core.")
                 for target in sorted(targets)
                 if not any(target == allowed or target.startswith(allowed + ".")
                            for allowed in CORE_MAY_IMPORT)]
    assert offenders == []


def _task_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    return [node for node in tree.body if isinstance(node, ast.FunctionDef)
            and any("task" in ast.dump(decorator) for decorator in node.decorator_list)]


def test_jobs_reach_the_platform_only_from_task_bodies():
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith("jobs.") or name.startswith("jobs.training"):
            continue
        tree = ast.parse(path.read_text())
        allowed = ({id(node) for task in _task_functions(tree) for node in ast.walk(task)}
                   if name == "jobs.tasks" else set())
        offenders += [f"{name}: {target}" for node in ast.walk(tree) if id(node) not in allowed
                      for target in _ours(_imported(node))
                      if not target.startswith("jobs.")]
    assert offenders == []


def _one_call(task: ast.FunctionDef) -> str | None:
    """None when the task's body is one call of the one name it imports, with the task's own
    arguments (after a docstring and that import); else what is wrong."""
    body = list(task.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    imports = [statement for statement in body if isinstance(statement, ast.ImportFrom)]
    rest = [statement for statement in body if not isinstance(statement, ast.ImportFrom)]
    names = [alias.asname or alias.name for statement in imports for alias in statement.names]
    if len(names) != 1:
        return f"imports {names or 'nothing'}: one platform entry point per task"
    if len(rest) != 1 or not isinstance(rest[0], (ast.Expr, ast.Return)):
        return f"has {len(rest)} statements besides its import: one call, nothing else"
    call = rest[0].value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
            and call.func.id == names[0]):
        return f"does not just call {names[0]}"
    parameters = [argument.arg for argument in task.args.args]
    passed = [argument.id for argument in call.args if isinstance(argument, ast.Name)]
    passed += [keyword.value.id for keyword in call.keywords if isinstance(keyword.value, ast.Name)]
    if len(passed) != len(call.args) + len(call.keywords) or sorted(passed) != sorted(parameters):
        return f"passes {ast.unparse(call)}, not just its arguments {parameters}"
    return None


def test_each_task_body_is_one_call_into_the_platform():
    tree = ast.parse((ROOT / "jobs" / "tasks.py").read_text())
    tasks = _task_functions(tree)
    assert len(tasks) >= 6
    problems = {task.name: problem for task in tasks if (problem := _one_call(task))}
    assert problems == {}


@pytest.mark.parametrize("source, wrong", [
    ("def t(job_id):\n    from x import f\n    return f(job_id)\n", False),
    ("def t(job_id):\n    from x import f, g\n    if f(job_id):\n        g()\n", True),
    ("def t(job_id):\n    from x import f\n    f(job_id)\n    f(job_id)\n", True),
    ("def t(token):\n    from x import f\n    f(f'key:{token}')\n", True),
])
def test_the_one_call_rule_tells_one_call_from_logic(source, wrong):
    task = ast.parse(source).body[0]
    assert (_one_call(task) is not None) == wrong
