"""dsmoe's native layer: the C library behind one header (``dsmoe_native.h``: matmul.c, ops.c,
layer_step.c, abi.c), found, loaded and checked against that header by ``library``, and its kernels
that are not quantization (``ops``). The quantized matmuls' Python side is dsmoe.quant.kernels.
This package imports nothing from dsmoe but dsmoe.errors."""
