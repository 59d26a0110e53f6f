"""The project's shape: every import points down. Scripts may build on shared modules and on the scripts of
earlier tasks; shared modules never import a script; no module imports one that imports it back."""
import ast
import glob
import os

from conftest import ROOT

SHARED = {'layers', 'fast_layers', 'im2col', 'nn', 'run', 'checkpoint', 'cli', 'errors', 'readback', 'student', 'data',
          'safe_pickle', 'metrics', 'plots', 'summary', 'muon', 'distributed'}


def imports_of_every_module():
    """{module: set of this repository's modules it imports, anywhere in its file (inside functions too)}."""
    modules = {os.path.basename(path)[:-3]: path for path in glob.glob(os.path.join(ROOT, '*.py'))}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(open(path).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split('.')[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split('.')[0])
        graph[name] = (found & set(modules)) - {name}
    return graph


def test_the_shared_modules_are_the_ones_listed_here():
    scripts = {name for name in imports_of_every_module() if name not in SHARED}
    assert scripts >= {'train', 'train_l2reg', 'train_pytorch', 'train_cifar', 'hinge_loss', 'check_grads', 'lab'}
    for name in SHARED - set(imports_of_every_module()):
        assert not os.path.exists(os.path.join(ROOT, f'{name}.py')), name


def test_shared_modules_never_import_a_script():
    for name, imported in imports_of_every_module().items():
        if name in SHARED:
            assert imported <= SHARED, f"{name} imports the script(s) {sorted(imported - SHARED)}"


def test_no_module_imports_one_that_imports_it():
    graph = imports_of_every_module()

    def reaches(start, target, seen):
        return any(next_ == target or (next_ not in seen and reaches(next_, target, seen | {next_}))
                   for next_ in graph[start])
    cycles = [name for name in graph if reaches(name, name, {name})]
    assert not cycles, f"import cycles through {sorted(cycles)}"
