"""The tensors of a stored quantized checkpoint that a load maps without reading them.

Both the loader (which maps them with their pages left to fault in) and the console script's
read-ahead (which then leaves them out) ask here; nothing heavy is imported, as the read-ahead runs
before torch is.
"""

from __future__ import annotations

from collections.abc import Collection

EMBEDDING = "model.embed_tokens.weight"

NATIVE_SCALES = "native_scales"
"""``X.weight.native_scales``: stored beside a 4-bit ``X.weight`` that is in dsmoe's kernel layout
(``kernels.pack_4bit``), its block scales in the kernels' tile-major bf16; a weight without it is in
bitsandbytes' layout."""


def mapped_lazily(names: Collection[str]) -> set[str]:
    """Of a stored quantized checkpoint's tensor names, those a CPU load maps with their pages left
    to fault in, as llama.cpp maps its token embeddings: the embedding table, of whose 419 MB (16B)
    a prompt reads a row a token, and bitsandbytes' absmax beside a weight's kernel scales, which
    only ``dequantized`` and a save read. On an 8-layer stored 4-bit load they were 0.31 and 0.67 s
    of the reader's time (warm, 2 cores); a cold start now never reads them from disk."""
    present = set(names)
    suffix = f".weight.{NATIVE_SCALES}"
    absmax = {name[: -len(NATIVE_SCALES)] + "absmax" for name in present if name.endswith(suffix)}
    return ({EMBEDDING} | absmax) & present
