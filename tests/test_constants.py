"""``mtmerge/_constants.py`` and its C++ mirror ``csrc/common/constants.h`` agree, name for name
(``NAME`` -> ``kName``, CamelCase with a ``k`` prefix) and value for value."""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path

import pytest

from mtmerge import _constants

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "common" / "constants.h"
_DECL = re.compile(r"\bconstexpr\s+(?:[\w:]+\s+)+?(k[A-Z]\w*)\s*(?:=\s*([^;{]+)|\{([^;}]+)\});")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.LShift: operator.lshift,
        ast.RShift: operator.rshift, ast.BitOr: operator.or_, ast.BitAnd: operator.and_, ast.BitXor: operator.xor,
        ast.FloorDiv: operator.floordiv}


def cpp_name(python_name: str) -> str:
    """INT64_MAX -> kInt64Max, F32_INF_KEY -> kF32InfKey."""
    return "k" + "".join(part[:1].upper() + part[1:].lower() for part in python_name.split("_"))


def python_constants() -> dict[str, int | float]:
    return {name: value for name, value in vars(_constants).items()
            if name.isupper() and not name.startswith("_") and isinstance(value, int | float)}


def _evaluate(expr: str, known: dict[str, int]) -> int:
    """A C++ integer constant expression of the simple kinds constants.h uses."""
    text = re.sub(r"std::numeric_limits<\s*int64_t\s*>::max\(\)|\bINT64_MAX\b", str(2**63 - 1), expr)
    text = re.sub(r"static_cast<[\w:\s]+>\s*", "", text)
    text = re.sub(r"\b(?:std::)?u?int(?:8|16|32|64)_t\s*(?=\()", "", text)  # functional casts int64_t(1)
    text = re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", text)  # literal suffixes
    text = re.sub(r"\b(\d+\.\d*)[fF]\b", r"\1", text)  # float literal suffix
    text = text.replace("/", "//")

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.Name) and node.id in known:
            return known[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"cannot evaluate {expr!r} in {HEADER.name}")

    return walk(ast.parse(text.strip(), mode="eval"))


def header_constants() -> dict[str, int]:
    assert HEADER.is_file(), f"{HEADER} is missing: it mirrors mtmerge/_constants.py"
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    found: dict[str, int] = {}
    for name, value, braced in _DECL.findall(text):
        found[name] = _evaluate(value or braced, found)
    return found


def test_the_name_rule():
    assert cpp_name("INT64_MAX") == "kInt64Max"
    assert cpp_name("F32_INF_KEY") == "kF32InfKey"
    assert cpp_name("DARE_HIGH_WORD_SALT") == "kDareHighWordSalt"
    assert _evaluate("(int64_t(1) << 24)", {}) == 1 << 24
    assert _evaluate("0x7F800000u", {}) == 0x7F800000
    assert _evaluate("std::numeric_limits<int64_t>::max()", {}) == 2**63 - 1
    assert _evaluate("kA + 1", {"kA": 3}) == 4
    assert _evaluate("1.702", {}) == 1.702 and _evaluate("7.0f", {}) == 7.0


def test_header_mirrors_python_constants():
    python = python_constants()
    header = header_constants()
    assert {"INT64_MAX", "F32_INF_KEY", "DARE_KEEP_ONE", "DARE_HIGH_WORD_SALT"} <= set(python)
    missing = sorted(f"{name} -> {cpp_name(name)}" for name in python if cpp_name(name) not in header)
    assert not missing, f"constants.h lacks: {missing}"
    extra = sorted(set(header) - {cpp_name(name) for name in python})
    assert not extra, f"constants.h has constants _constants.py lacks: {extra}"
    differ = {name: (value, header[cpp_name(name)]) for name, value in python.items()
              if header[cpp_name(name)] != value}
    assert not differ, f"values differ (python, C++): {differ}"


@pytest.mark.parametrize(("name", "value"), [("INT64_MAX", 2**63 - 1), ("F32_INF_KEY", 0x7F800000),
                                             ("DARE_KEEP_ONE", 1 << 24), ("DARE_HIGH_WORD_SALT", 0x68E31DA4)])
def test_documented_values(name, value):
    assert getattr(_constants, name) == value
