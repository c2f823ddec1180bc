"""dsmoe's native library as Python sees it: where it is, its interface, and the check that both agree.

The interface is declared once, in ``dsmoe_native.h`` (shipped beside this file). Its ``DSMOE_``
constants are read from the header itself, so they exist even where the library was not built; its
structs are mirrored below in ctypes and each entry point's argument types are in ``SIGNATURES``.
Before the library is used it is asked what it was built with (``dsmoe_abi_version``, then
``dsmoe_abi_facts``: every constant, each struct's size and its fields' offsets), and it is refused
unless that is exactly what this side expects. A library left from another checkout (``git pull``
does not rebuild an editable install) would otherwise read its structs at the wrong offsets: wrong
numbers or a crash, far from the cause.

A refused library counts as absent, like one that was never built: the PyTorch kernels compute the
same model, so loading and running a model still work (that is what every caller of
``native_library`` already handles), and the one-line reason is what ``native_kernels_in_use``
reports (``dsmoe bench`` shows it) and what tests/test_native_kernels.py fails with.
``load_library`` raises the same line as a ``NativeLibraryError``.
"""

from __future__ import annotations

import ctypes as ct
import functools
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

from dsmoe.errors import NativeLibraryError

HEADER = Path(__file__).with_name("dsmoe_native.h")
EXTENSION = "dsmoe.native._native"
"""The library's module name: pip builds it at install (pyproject's ext-modules), optional."""
_REBUILD = "reinstall dsmoe to rebuild it (pip install -e . in a checkout)"


def header_constants(text: str) -> dict[str, int]:
    """Every ``#define DSMOE_<NAME> <integer>`` of a header; a value that is not a plain integer is
    an error in the header (Python would have to evaluate C to read it)."""
    constants = {}
    for name, value in re.findall(r"^#define (DSMOE_\w+)[ \t]+(\S+)", text, flags=re.MULTILINE):
        if not re.fullmatch(r"-?[0-9]+", value):
            raise ValueError(f"{HEADER.name}: {name} is {value!r}, not a plain integer")
        constants[name] = int(value)
    return constants


CONSTANTS = header_constants(HEADER.read_text())
ABI_VERSION = CONSTANTS["DSMOE_ABI_VERSION"]
ACT_BLOCK = CONSTANTS["DSMOE_ACT_BLOCK"]
"""Activation values per int8 scale in the matmuls; their input widths must be multiples of it."""
TILE_ROWS = CONSTANTS["DSMOE_TILE_ROWS"]
"""Output rows per tile of the native 4-bit layout (bitsandbytes' CPU tiles)."""
MLP_POINTERS = CONSTANTS["DSMOE_MLP_POINTERS"]
"""Weight pointers per SwiGLU MLP: gate, its scale, up, its scale, down, its scale."""
ATTENTION_POINTERS = CONSTANTS["DSMOE_ATTENTION_POINTERS"]
"""Weight pointers of an attention block: q, k, v, o, each followed by its scale."""
MAX_TOP_K = CONSTANTS["DSMOE_MAX_TOP_K"]
"""The most routed experts per token the native router and layer step take."""
ISA_NONE, ISA_VNNI, ISA_AVX2 = (CONSTANTS[f"DSMOE_ISA_{name}"] for name in ("NONE", "VNNI", "AVX2"))
Q6_MAX = CONSTANTS["DSMOE_Q6_MAX"]
"""The largest |code| of dsmoe's 6-bit format; codes are stored as q + Q6_MAX + 1."""
Q6_BLOCK_BYTES = CONSTANTS["DSMOE_Q6_BLOCK_BYTES"]
"""Bytes of one q6 block of ACT_BLOCK values (low nibbles, then the top two bits)."""
BF16_K_STEP = CONSTANTS["DSMOE_BF16_K_STEP"]
"""The native bf16 matmul's input widths are multiples of it."""
DTYPE_F32, DTYPE_BF16, DTYPE_F16 = (CONSTANTS[f"DSMOE_DTYPE_{name}"] for name in ("F32", "BF16", "F16"))
"""The element types the native quantizers read."""
CODES_4BIT = CONSTANTS["DSMOE_4BIT_CODES"]
MAX_QUANT_BLOCK = CONSTANTS["DSMOE_MAX_QUANT_BLOCK"]
"""The largest 4-bit blocksize the native quantizer takes."""


class AttentionHalf(ct.Structure):
    """The C struct ``attention_half``, field for field."""

    _fields_ = [
        ("lut", ct.c_void_p),
        ("input_norm", ct.c_void_p),
        ("post_norm", ct.c_void_p),
        ("proj", ct.c_void_p * ATTENTION_POINTERS),
        ("router", ct.c_void_p),
        ("blocksize", ct.c_int64),
        ("hidden", ct.c_int64),
        ("n_heads", ct.c_int64),
        ("n_kv", ct.c_int64),
        ("head_dim", ct.c_int64),
        ("n_experts", ct.c_int64),
        ("top_k", ct.c_int64),
        ("unit", ct.c_float),
        ("eps", ct.c_float),
        ("norm_topk", ct.c_int32),
    ]


class LayerStep(ct.Structure):
    """The C struct ``layer_step``, field for field."""

    _fields_ = [
        ("attn", AttentionHalf),
        ("mlp_lut", ct.c_void_p),
        ("mlp_unit", ct.c_float),
        ("mlp_blocksize", ct.c_int64),
        ("inter", ct.c_int64),
        ("shared_inter", ct.c_int64),
        ("experts", ct.c_void_p),
        ("shared", ct.c_void_p * MLP_POINTERS),
    ]


class AbiFact(ct.Structure):
    """The C struct ``dsmoe_abi_fact``: one entry of the library's ``dsmoe_abi_facts`` table."""

    _fields_ = [("name", ct.c_char_p), ("value", ct.c_int64)]


MIRRORS: dict[str, type[ct.Structure]] = {"attention_half": AttentionHalf, "layer_step": LayerStep}
"""The structs Python fills, by their C names: their layout is part of the check."""

_i64, _ptr, _int, _float = ct.c_int64, ct.c_void_p, ct.c_int, ct.c_float
SIGNATURES: dict[str, Sequence[type]] = {
    "dsmoe_abi_version": [],
    "dsmoe_abi_facts": [_ptr],
    "dsmoe_native_isa": [],
    "dsmoe_native_4bit": [],
    "dsmoe_native_use_isa": [_int],
    "dsmoe_int8_gemv": [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _int],
    "dsmoe_int8_mlp": [_i64, _i64] + [_ptr] * 8,
    "dsmoe_4bit_mlp": [_ptr, _float, _i64, _i64, _i64] + [_ptr] * 8,
    "dsmoe_experts": [_ptr, _float, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr],
    "dsmoe_4bit_gemm": [_ptr, _float, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr],
    "dsmoe_moe_up": [_ptr, _float, _i64, _i64, _i64, _i64] + [_ptr] * 7,
    "dsmoe_moe_down": [_ptr, _float, _i64, _i64, _i64, _i64] + [_ptr] * 7,
    "dsmoe_pack_4bit": [_i64, _i64, _ptr, _ptr],
    "dsmoe_q6_gemv": [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _int],
    "dsmoe_bf16_matmul": [_i64, _i64, _i64, _ptr, _ptr, _ptr],
    "dsmoe_attention_decode": [_i64] * 5 + [_ptr] * 8,
    "dsmoe_rmsnorm": [_i64, _float, _ptr, _ptr, _ptr],
    "dsmoe_router": [_i64, _i64, _i64, _int, _ptr, _ptr, _ptr, _ptr],
    "dsmoe_decode_layers": [_ptr, _i64, _i64, _i64] + [_ptr] * 5 + [_i64, _ptr, _ptr, _ptr, _ptr],
    "dsmoe_quantize_4bit": [_ptr, _int, _i64, _i64, _ptr, _ptr, _ptr, _ptr],
    "dsmoe_quantize_int8": [_ptr, _int, _i64, _i64, _ptr, _ptr],
    "dsmoe_quantize_q6": [_ptr, _int, _i64, _i64, _ptr, _ptr],
}
"""Every entry point of dsmoe_native.h and its argument types; each returns a C int."""


def expected_facts() -> dict[str, int]:
    """What ``dsmoe_abi_facts`` must say: the header's constants, and each mirrored struct's size and
    field offsets as ctypes lays them out."""
    facts = dict(CONSTANTS)
    for name, mirror in MIRRORS.items():
        facts[f"sizeof({name})"] = ct.sizeof(mirror)
        for field, *_ in mirror._fields_:
            facts[f"offsetof({name}, {field})"] = getattr(mirror, field).offset
    return facts


def library_facts(lib: ct.CDLL) -> dict[str, int]:
    """The library's own ``dsmoe_abi_facts`` table."""
    table = ct.POINTER(AbiFact)()
    count = lib.dsmoe_abi_facts(ct.byref(table))
    return {table[i].name.decode(): table[i].value for i in range(count)}


def _differences(built: dict[str, int], expected: dict[str, int]) -> list[str]:
    """Each fact the library and this side disagree on: constants first, then sizes, then offsets."""
    def order(name: str) -> tuple[int, str]:
        return (0 if name.startswith("DSMOE_") else 1 if name.startswith("sizeof") else 2, name)

    missing = "missing"
    return [f"{name} is {built.get(name, missing)} there, {expected.get(name, missing)} here"
            for name in sorted(built.keys() | expected.keys(), key=order) if built.get(name) != expected.get(name)]


def load_library(path: str) -> ct.CDLL:
    """The library at ``path`` with every entry point's types set, once it has passed the check.

    Raises ``NativeLibraryError`` (one line, naming the path, the first difference and the fix)
    when it cannot be loaded, has no or another ABI version, or another layout of its structs.
    """
    def refuse(why: str) -> NativeLibraryError:
        return NativeLibraryError(f"dsmoe's native library {path} {why}: {_REBUILD}")

    try:
        lib = ct.CDLL(path)
    except OSError as error:  # built elsewhere, and this machine lacks a library it links (libgomp)
        raise refuse(f"cannot be loaded ({' '.join(str(error).split())})") from None
    if not hasattr(lib, "dsmoe_abi_version") or not hasattr(lib, "dsmoe_abi_facts"):
        raise refuse("has no ABI version (it was built before dsmoe_native.h)")
    for name in ("dsmoe_abi_version", "dsmoe_abi_facts"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = SIGNATURES[name], ct.c_int
    if (built := lib.dsmoe_abi_version()) != ABI_VERSION:
        raise refuse(f"has ABI version {built} and this dsmoe needs {ABI_VERSION}")
    differences = _differences(library_facts(lib), expected_facts())
    if differences:
        more = f" and {len(differences) - 1} more" if len(differences) > 1 else ""
        raise refuse(f"was built from another {HEADER.name} ({differences[0]}{more})")
    missing = [name for name in SIGNATURES if not hasattr(lib, name)]
    if missing:
        raise refuse(f"lacks {', '.join(missing)}")
    for name, argtypes in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ct.c_int
    return lib


@functools.cache
def _found() -> tuple[ct.CDLL | None, str]:
    """The library, or None and why not."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return None, "not built"
    try:
        lib = load_library(spec.origin)
    except NativeLibraryError as error:
        return None, str(error)
    if lib.dsmoe_native_isa() == ISA_NONE:
        return None, "this CPU lacks AVX2"
    return lib, ""


def native_library() -> ct.CDLL | None:
    """dsmoe's native kernels, or None where they are not built, fail the check, or this CPU lacks AVX2."""
    return _found()[0]


def native_library_problem() -> str:
    """Why ``native_library`` is None (one line), or "" where it is not."""
    return _found()[1]


def native_kernels_in_use() -> str:
    """What runs the decode kernels on this machine, for reports: the instruction set, or why none."""
    lib, why = _found()
    if lib is None:
        return f"none ({why}): PyTorch kernels"
    return {ISA_VNNI: "AVX512-VNNI", ISA_AVX2: "AVX2"}[lib.dsmoe_native_isa()]


def check_status(status: int, what: str) -> None:
    """Kernels return 0, -1 for arguments they cannot take, -2 when out of memory; their callers
    check the arguments first, so anything else than 0 is a bug or the end of memory."""
    if status != 0:
        raise RuntimeError(f"native {what} kernel failed with status {status}")
