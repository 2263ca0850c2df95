"""The sync and async twins are one source read twice: service/service_async must be equal
modulo ``async``/``await`` and the names of the asyncio types, function by function (bodies,
signatures, docstrings); the leases, whose machinery differs (a thread vs a task), must offer
the same public methods with the same signatures and docstrings."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from outbound_heartbeat import lease, lease_async, service, service_async

PACKAGE = Path(service.__file__).resolve().parent

#: How the async module spells what the sync one calls: replaced before comparing.
ASYNC_NAMES = {
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncConnection": "Connection",
    "service_async": "service",
    "AsyncLease": "Lease",
    "AbstractAsyncContextManager": "AbstractContextManager",
    "asynccontextmanager": "contextmanager",
    "run_async": "run",
    "async_lock_for": "lock_for",
    "AsyncIterator": "Iterator",
}

#: Functions that differ by design, and why.
KNOWN_DIFFERENCES = {
    "_run": "after-commit callbacks may be coroutines in the async twin: they are awaited",
}


class _Desugar(ast.NodeTransformer):
    def visit_Await(self, node: ast.Await) -> ast.AST:
        return self.visit(node.value)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        self.generic_visit(node)
        return ast.FunctionDef(**{f: getattr(node, f) for f in node._fields})

    def visit_AsyncWith(self, node: ast.AsyncWith) -> ast.AST:
        self.generic_visit(node)
        return ast.With(**{f: getattr(node, f) for f in node._fields})

    def visit_AsyncFor(self, node: ast.AsyncFor) -> ast.AST:
        self.generic_visit(node)
        return ast.For(**{f: getattr(node, f) for f in node._fields})

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node.id = ASYNC_NAMES.get(node.id, node.id)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        node.attr = ASYNC_NAMES.get(node.attr, node.attr)
        return node


def _functions(path: Path, desugar: bool) -> dict[str, str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if desugar:
        tree = _Desugar().visit(tree)
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node) or ""
            for word, plain in ASYNC_NAMES.items():
                doc = doc.replace(word, plain)
            body = node.body[1:] if ast.get_docstring(node) else node.body
            node_copy = ast.FunctionDef(
                name=node.name, args=node.args, body=body, decorator_list=node.decorator_list,
                returns=node.returns, type_comment=None, type_params=[],
            )
            out[node.name] = doc + "\n" + ast.dump(node_copy, include_attributes=False)
    return out


def test_service_twins_are_equal_modulo_await() -> None:
    sync = _functions(PACKAGE / "service.py", desugar=False)
    async_ = _functions(PACKAGE / "service_async.py", desugar=True)
    assert sorted(sync) == sorted(async_)
    different = [n for n in sync if sync[n] != async_[n] and n not in KNOWN_DIFFERENCES]
    assert different == []
    assert service.__all__ == service_async.__all__


#: Methods shared by both twins through LeaseView: plain calls on the shared state.
SHARED_METHODS = {"check", "touch"}


@pytest.mark.parametrize("name", sorted(n for n in dir(lease.Lease) if not n.startswith("_")))
def test_lease_twins_offer_the_same_api(name: str) -> None:
    sync_member = inspect.getattr_static(lease.Lease, name)
    async_member = inspect.getattr_static(lease_async.AsyncLease, name, None)
    assert async_member is not None, f"AsyncLease has no {name}"
    if inspect.isfunction(sync_member):
        assert inspect.signature(sync_member) == inspect.signature(async_member)
        assert inspect.iscoroutinefunction(async_member) == (name not in SHARED_METHODS)
        sync_doc = inspect.getdoc(sync_member) or ""
        async_doc = inspect.getdoc(async_member) or ""
        assert sync_doc and sync_doc == async_doc.replace("AsyncLease", "Lease")
    else:
        assert type(sync_member) is type(async_member)  # a property stays a property


#: Hub code that must be one source read twice (the loops around it differ: threads vs tasks).
HUB_TWINS = ["final_beats", "finish_runs", "pooled", "LeaseHub.register", "LeaseHub.unregister",
             "LeaseHub._beat", "Batcher._run"]
HUB_NAMES = {**ASYNC_NAMES, "AsyncLeaseHub": "LeaseHub", "AsyncBatcher": "Batcher",
             "hub_async": "hub"}


def _hub_code(path: Path, desugar: bool) -> dict[str, str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if desugar:
        tree = _Desugar().visit(tree)
    out = {}
    for node in [tree, *(n for n in tree.body if isinstance(n, ast.ClassDef))]:
        for child in node.body:
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                owner = f"{node.name}." if isinstance(node, ast.ClassDef) else ""
                name = owner + child.name
                for word, plain in HUB_NAMES.items():
                    name = name.replace(word, plain)
                body = child.body[1:] if ast.get_docstring(child) else child.body
                out[name] = "\n".join(ast.dump(stmt) for stmt in body)
    return out


@pytest.mark.parametrize("name", HUB_TWINS)
def test_hub_twins_are_equal_modulo_await(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for word, plain in HUB_NAMES.items():
        monkeypatch.setitem(ASYNC_NAMES, word, plain)
    sync = _hub_code(PACKAGE / "hub.py", desugar=False)
    async_ = _hub_code(PACKAGE / "hub_async.py", desugar=True)
    assert name in sync and name in async_
    assert sync[name] == async_[name]
