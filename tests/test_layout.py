"""The package's floors (docs/architecture.md): imports between its folders run one way,
no two files import each other around a circle, nothing in it imports tools/ or exits,
and each hook in engine/hooks/ is a registered hook of its own file. Read from the
source, so a lazy import inside a function counts as much as one at the top."""
import ast
import os.path as osp
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'mmrepvgg'

#: Top to bottom: a floor may import the floors below it, never one above. Folders and
#: modules on one floor do not import each other.
FLOORS = [
    ['benchmark'],
    ['reproduce'],
    ['apis'],
    ['engine', 'qat'],
    ['deploy'],
    ['convert'],
    ['ops'],
    ['reparam'],
    ['models'],
    ['checkpoint'],
    ['env', 'numerics', 'fileio', 'registry', 'testing', 'errors', 'version'],
]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict:
    return {_module(p): p for p in PACKAGE.rglob('*.py')}


def _imports(modules: dict) -> dict:
    """Module -> the package modules it imports (``from . import x`` counts as the
    submodule ``x`` where there is one, not as the package)."""
    edges = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')[:len(package.split('.')) - node.level + 1]
                    target = '.'.join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ''
                subs = [f'{target}.{a.name}' for a in node.names
                        if f'{target}.{a.name}' in modules]
                found = subs if subs and len(subs) == len(node.names) else [target] + subs
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            edges[name].update(t for t in found if t in modules and t != name)
    return edges


def _unit(module: str) -> str:
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else '__init__'


def test_imports_run_down_the_floors():
    floor = {unit: level for level, units in enumerate(FLOORS) for unit in units}
    modules = _modules()
    units = {_unit(m) for m in modules} - {'__init__'}
    assert units <= set(floor), f'place {sorted(units - set(floor))} on a floor'
    upward = []
    for source, targets in _imports(modules).items():
        for target in targets:
            a, b = _unit(source), _unit(target)
            if a == '__init__' or a == b:
                continue  # the public face imports what it exports
            if floor[b] <= floor[a]:
                upward.append(f'{source} -> {target}')
    assert not upward, 'imports that do not run down the floors: ' + ', '.join(upward)


def test_no_two_files_import_each_other_around_a_circle():
    # between files: a package's __init__ only gathers its files' names for users
    modules = _modules()
    files = {m for m, p in modules.items() if p.name != '__init__.py'}
    edges = {m: {t for t in ts if t in files} for m, ts in _imports(modules).items()
             if m in files}
    circles = sorted(f'{m} -> {t} -> ... -> {m}' for m, ts in edges.items() for t in ts
                     if m in _closure(edges, t))
    assert not circles, 'import circles: ' + '; '.join(circles)


def _closure(edges: dict, start: str) -> set:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_nothing_in_the_package_exits_or_imports_the_tools():
    offenders = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    getattr(node.exc.func, 'id', None) == 'SystemExit':
                offenders.append(f'{name}:{node.lineno} raises SystemExit')
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, 'module', '') or '']
                if any(n == 'tools' or n.startswith('tools.') for n in names):
                    offenders.append(f'{name}:{node.lineno} imports tools')
    assert not offenders, offenders


def test_each_hook_is_registered_in_a_file_of_its_own():
    from mmengine.hooks import Hook

    import mmrepvgg
    from mmrepvgg.engine import hooks
    folder = Path(hooks.__file__).parent
    for path in sorted(folder.glob('*.py')):
        if path.name == '__init__.py':
            continue
        classes = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
        assert len(classes) == 1, f'{path.name}: one hook per file, found {len(classes)}'
        name = classes[0].name
        cls = getattr(hooks, name)
        assert issubclass(cls, Hook) and mmrepvgg.HOOKS.get(name) is cls, name
        assert osp.splitext(path.name)[0] == ''.join(
            f'_{c.lower()}' if c.isupper() else c for c in name).lstrip('_'), path.name
