"""The native library's one interface: Python's view of it (native/library.py) is the header's
(native/dsmoe_native.h), and a library built from another header is refused with one line."""

from __future__ import annotations

import ast
import ctypes as ct
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dsmoe.errors import NativeLibraryError
from dsmoe.native import library
from dsmoe.native.library import (
    ABI_VERSION,
    CONSTANTS,
    HEADER,
    SIGNATURES,
    header_constants,
    library_facts,
    load_library,
)

NATIVE_DIR = HEADER.parent
C_TYPES = {"int64_t": ct.c_int64, "float": ct.c_float, "int": ct.c_int, "int32_t": ct.c_int}
"""How each C parameter type of dsmoe_native.h travels through ctypes (any pointer: c_void_p)."""


@pytest.fixture(scope="module")
def built() -> str:
    """The installed library's path: it must be built (tests/test_native_kernels.py says the same)."""
    spec = importlib.util.find_spec(library.EXTENSION)
    assert spec is not None and spec.origin is not None, "dsmoe.native._native was not built (pip install -e .)"
    return spec.origin


def _header_declarations() -> dict[str, tuple[str, list[str]]]:
    """Every function dsmoe_native.h declares: name -> (return type, parameter declarations)."""
    text = re.sub(r"/\*.*?\*/", " ", HEADER.read_text(), flags=re.DOTALL)
    found = {}
    for returns, name, params in re.findall(r"^(\w[\w \t\*]*?)\s*\b(dsmoe_\w+)\s*\(([^)]*)\)\s*;", text,
                                            flags=re.MULTILINE):
        found[name] = (returns.strip(), [p.strip() for p in params.split(",") if p.strip() not in ("", "void")])
    return found


def _function_pointer_types() -> set[str]:
    """The header's function-pointer typedefs (a callback travels as an address)."""
    return set(re.findall(r"typedef\s+\w+\s*\(\s*\*\s*(\w+)\s*\)", HEADER.read_text()))


def _ctype(parameter: str) -> type:
    if "*" in parameter or parameter.split()[0] in _function_pointer_types():
        return ct.c_void_p
    words = parameter.replace("const", " ").split()
    return C_TYPES[words[0]]


def _compiler() -> str:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a mismatching library")
    return compiler


def _build_abi_library(tmp_path: Path, edit_header: Callable[[str], str]) -> str:
    """abi.c compiled against a copy of the header changed by ``edit_header``: the facts a library
    built from that header would report."""
    header = HEADER.read_text()
    changed = edit_header(header)
    assert changed != header, "the edit must change the header"
    (tmp_path / HEADER.name).write_text(changed)
    shutil.copy(NATIVE_DIR / "abi.c", tmp_path / "abi.c")
    out = tmp_path / "mismatched.so"
    subprocess.run([_compiler(), "-shared", "-fPIC", "-O1", str(tmp_path / "abi.c"), "-o", str(out)], check=True)
    return str(out)


def _refusal(path: str) -> str:
    with pytest.raises(NativeLibraryError) as refused:
        load_library(path)
    message = str(refused.value)
    assert "\n" not in message and path in message and "pip install -e ." in message, message
    return message


def test_the_installed_library_passes_the_check(built: str) -> None:
    lib = load_library(built)
    assert lib.dsmoe_abi_version() == ABI_VERSION
    assert library_facts(lib) == library.expected_facts()


def test_the_header_constants_are_the_library_s(built: str) -> None:
    """Python reads the header's text; the library reports what the C compiler made of it."""
    compiled = {name: value for name, value in library_facts(load_library(built)).items()
                if name.startswith("DSMOE_")}
    assert compiled == CONSTANTS
    assert CONSTANTS["DSMOE_MAX_MLPS"] == CONSTANTS["DSMOE_MAX_TOP_K"] + 1  # the routed experts and one shared MLP


def test_every_header_entry_point_has_its_argument_types_and_no_other() -> None:
    declared = _header_declarations()
    assert declared.keys() == SIGNATURES.keys()
    for name, (returns, params) in declared.items():
        assert returns == "int", name  # load_library sets restype c_int for all
        assert [_ctype(p) for p in params] == list(SIGNATURES[name]), name


def test_the_library_exports_the_header_s_entry_points_only(built: str) -> None:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not installed")
    listing = subprocess.run([nm, "-D", "--defined-only", built], check=True, capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in listing.splitlines() if line.split()[-2:-1] == ["T"]}
    assert exported == set(_header_declarations())


def test_a_library_of_another_abi_version_is_refused(tmp_path: Path) -> None:
    path = _build_abi_library(tmp_path, lambda h: h.replace(f"#define DSMOE_ABI_VERSION {ABI_VERSION}\n",
                                                            f"#define DSMOE_ABI_VERSION {ABI_VERSION + 1}\n"))
    message = _refusal(path)
    assert f"has ABI version {ABI_VERSION + 1} and this dsmoe needs {ABI_VERSION}" in message


def test_a_library_with_another_struct_layout_is_refused(tmp_path: Path) -> None:
    """The version left as it was (someone forgot to raise it): the struct sizes still tell."""
    field = "int64_t mlp_blocksize, inter, shared_inter;"
    path = _build_abi_library(tmp_path, lambda h: h.replace(field, field.replace(";", ", spare;")))
    message = _refusal(path)
    size = ct.sizeof(library.LayerStep)
    assert f"(sizeof(layer_step) is {size + 8} there, {size} here and 2 more)" in message, message


def test_a_library_without_an_abi_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "old.c").write_text("int dsmoe_native_isa(void) { return 2; }\n")
    out = tmp_path / "old.so"
    subprocess.run([_compiler(), "-shared", "-fPIC", str(tmp_path / "old.c"), "-o", str(out)], check=True)
    assert "has no ABI version" in _refusal(str(out))


def test_python_expecting_another_version_or_layout_refuses_the_installed_library(
        built: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library, "ABI_VERSION", ABI_VERSION + 1)
    assert f"has ABI version {ABI_VERSION} and this dsmoe needs {ABI_VERSION + 1}" in _refusal(built)
    monkeypatch.undo()

    class ShorterLayerStep(ct.Structure):
        _fields_ = [f for f in library.LayerStep._fields_ if f[0] != "shared"]

    monkeypatch.setitem(library.MIRRORS, "layer_step", ShorterLayerStep)
    size, shorter = ct.sizeof(library.LayerStep), ct.sizeof(ShorterLayerStep)
    assert f"sizeof(layer_step) is {size} there, {shorter} here" in _refusal(built)


@pytest.fixture
def fresh_lookup() -> Iterator[None]:
    """The library looked up again during the test and again after it."""
    library._found.cache_clear()
    yield
    library._found.cache_clear()


def test_a_refused_library_counts_as_absent_and_says_why(built: str, monkeypatch: pytest.MonkeyPatch,
                                                         fresh_lookup: None) -> None:
    """Callers fall back to the PyTorch kernels, as without a build; reports carry the one line."""
    monkeypatch.setattr(library, "ABI_VERSION", ABI_VERSION + 1)
    assert library.native_library() is None
    why = library.native_library_problem()
    assert why.startswith(f"dsmoe's native library {built} has ABI version {ABI_VERSION}") and "\n" not in why
    assert library.native_kernels_in_use() == f"none ({why}): PyTorch kernels"


def test_header_constants_must_be_plain_integers() -> None:
    assert header_constants("#define DSMOE_A 64\n#define DSMOE_GUARD_H\n#define OTHER 3\n") == {"DSMOE_A": 64}
    with pytest.raises(ValueError, match="DSMOE_B is '\\(DSMOE_A"):
        header_constants("#define DSMOE_A 64\n#define DSMOE_B (DSMOE_A + 1)\n")


def test_the_native_package_imports_nothing_of_dsmoe_but_its_errors() -> None:
    """Arrows point into the native layer (model -> quant -> native), never out of it."""
    imported = set()
    for source in NATIVE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    outside = {m for m in imported if m.split(".")[0] == "dsmoe" and not m.startswith("dsmoe.native")}
    assert outside == {"dsmoe.errors"}
