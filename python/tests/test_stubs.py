"""The type stubs (`rest/__init__.pyi`) describe the module as built: every name and method
they declare exists, and every public name of the module is declared."""

import ast
import inspect
import pathlib

import rest

STUB = pathlib.Path(rest.__file__).with_name("__init__.pyi")


def declared():
    tree = ast.parse(STUB.read_text())
    names, members = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        if isinstance(node, ast.ClassDef):
            members[node.name] = {
                n.name if isinstance(n, ast.FunctionDef) else n.target.id
                for n in node.body
                if isinstance(n, ast.FunctionDef)
                or (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
            }
    return names, members


def test_stubs_match_the_module():
    names, members = declared()
    public = {n for n in rest.__all__}
    assert public == names, (public ^ names)
    for cls, ms in members.items():
        have = {n for n in dir(getattr(rest, cls)) if not n.startswith("_")}
        # Instance attributes (Run's fields) are getters on the class.
        assert ms == have, (cls, ms ^ have)


def test_everything_public_has_a_docstring():
    for name in rest.__all__:
        obj = getattr(rest, name)
        if inspect.isclass(obj) or callable(obj):
            assert obj.__doc__, name
