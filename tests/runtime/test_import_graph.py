"""The import graph reads bottom-up: wire (transport) and engine at the bottom, the SD package on
the engine only, the runtime above them, the roles and the CLI on top; no circles anywhere.
grimp (import-linter's graph library) parses every module's imports, function-level and
TYPE_CHECKING ones included."""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("respec_async", "roles", "transport")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PACKAGES)


def imports_of(graph, prefix: str) -> set[str]:
    return {imported for module in graph.modules if module == prefix or module.startswith(prefix + ".")
            for imported in graph.find_modules_directly_imported_by(module)}


def strongly_connected(graph) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (import circles)."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:  # iterative: no recursion limit
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            for j in range(i, len(edges[node])):
                child = edges[node][j]
                if child not in index:
                    work.append((node, j + 1))
                    work.append((child, 0))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
    return circles


def test_no_import_circles(graph):
    assert strongly_connected(graph) == []


def test_the_circle_finder_finds_a_circle():
    class Graph:  # a -> b -> c -> a, and d -> a
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, module):
            return self.edges[module]

    assert strongly_connected(Graph()) == [["a", "b", "c"]]


def test_engine_and_transport_import_nothing_of_the_project_above_them(graph):
    assert {m for m in imports_of(graph, "respec_async.engine") if not m.startswith("respec_async.engine")} == set()
    assert {m for m in imports_of(graph, "transport") if not m.startswith("transport")} == set()


def test_the_sd_package_depends_on_the_engine_only(graph):
    outside = {m for m in imports_of(graph, "respec_async.sd")
               if not m.startswith(("respec_async.sd", "respec_async.engine"))}
    assert outside == set()


def test_only_the_cli_imports_the_supervisor(graph):
    assert graph.find_modules_that_directly_import("respec_async.supervisor") == {"respec_async.cli"}


def test_nothing_below_the_roles_imports_them(graph):
    importers = {m for m in graph.modules if not m.startswith("roles")
                 and any(i.startswith("roles") for i in graph.find_modules_directly_imported_by(m))}
    assert importers == set()
