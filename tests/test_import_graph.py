"""No import cycles among slim_jax modules, counting imports inside functions too.

One documented exception: DESIGN.md's public API keeps `llama.load_pretrained` /
`bert.load_pretrained` (and `save_pretrained`) on the model modules; those four functions
delegate to slim_jax/convert/pretrained.py, which the library itself calls. Their imports
are left out of the graph; any other import of convert/ from models/ is a cycle.
"""

import ast
import os

PUBLIC_API_ALIASES = {
    "slim_jax.models.llama": {"load_pretrained", "save_pretrained"},
    "slim_jax.models.bert": {"load_pretrained", "save_pretrained"},
}
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slim_jax")


def module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
  modules = {}
  for root, _, names in os.walk(PACKAGE):
    for n in names:
      if n.endswith(".py"):
        modules[module_name(os.path.join(root, n))] = os.path.join(root, n)
  graph = {}
  for name, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    edges = set()
    aliases = PUBLIC_API_ALIASES.get(name, set())
    tree.body = [n for n in tree.body
                 if not (isinstance(n, ast.FunctionDef) and n.name in aliases)]
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      edges |= {t for t in targets if t in modules and t != name}
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_finder_sees_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_slim_jax_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, " -> ".join(cycle)
