"""The shape of the code: no import cycles, short functions, one formatter.

Static checks over the source (no imports executed): the import graph of
`avs_jax` and `data_prep` (module-level and function-level imports alike)
has no cycle, `avs_jax` never imports `data_prep` (the dependency goes one
way), and no function in `avs_jax/` is longer than `MAX_LINES` (docstring
excluded) unless a `# long:` comment in it says why.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('avs_jax', 'data_prep')
MAX_LINES = 60


def modules():
  """`{dotted name: path}` of every module of PACKAGES."""
  out = {}
  for pkg in PACKAGES:
    for d, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in files:
        if f.endswith('.py'):
          rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3]
          name = rel.replace(os.sep, '.')
          out[
              name[: -len('.__init__')] if name.endswith('__init__') else name
          ] = os.path.join(d, f)
  return out


def imported(tree, name, known):
  """Modules of `known` that the module `name` (its AST) imports."""
  deps = set()
  package = (
      name
      if name in PACKAGES or any(k.startswith(name + '.') for k in known)
      else name.rpartition('.')[0]
  )
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      targets = [f'{base}.{a.name}' for a in node.names] + [base]
    else:
      continue
    for t in targets:
      while t and t not in known:
        t = t.rpartition('.')[0]
      if t and t != name:
        deps.add(t)
  return deps


def import_graph():
  known = modules()
  graph = {}
  for name, path in known.items():
    with open(path) as f:
      graph[name] = imported(ast.parse(f.read()), name, known)
  return graph


def find_cycle(graph):
  """A list of modules forming a cycle, or None."""
  state, stack = {}, []

  def visit(n):
    state[n] = 'open'
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      # A package's __init__ importing its own submodules is no cycle.
      if n in PACKAGES or m.startswith(n + '.'):
        continue
      if state.get(m) == 'open':
        return stack[stack.index(m) :] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 'done'
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_the_checker_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [
      'a',
      'b',
      'c',
      'a',
  ]
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  tree = ast.parse('def f():\n  from avs_jax import train\n')
  assert imported(
      tree, 'avs_jax.evaluate', {'avs_jax', 'avs_jax.train', 'avs_jax.evaluate'}
  ) == {'avs_jax', 'avs_jax.train'}


def test_no_import_cycle():
  graph = import_graph()
  assert 'avs_jax.train' in graph and graph['avs_jax.train']
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_avs_jax_does_not_import_data_prep():
  bad = {
      n: sorted(d for d in deps if d.startswith('data_prep'))
      for n, deps in import_graph().items()
      if n.startswith('avs_jax')
  }
  assert not {n: d for n, d in bad.items() if d}


def long_functions(path):
  with open(path) as f:
    src = f.read()
  lines = src.splitlines()
  out = []
  for node in ast.walk(ast.parse(src)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      n = node.end_lineno - node.lineno + 1
      doc = node.body[0]
      if (
          isinstance(doc, ast.Expr)
          and isinstance(doc.value, ast.Constant)
          and isinstance(doc.value.value, str)
      ):
        n -= doc.end_lineno - doc.lineno + 1  # the docstring does not count
      body = lines[node.lineno - 1 : node.end_lineno]
      if n > MAX_LINES and not any('# long:' in l for l in body):
        out.append(
            f'{os.path.relpath(path, ROOT)}:{node.lineno} '
            f'{node.name} ({n} lines)'
        )
  return out


def test_no_long_functions_in_avs_jax():
  found = [
      f
      for name, path in modules().items()
      if name.startswith('avs_jax')
      for f in long_functions(path)
  ]
  assert not found, found
