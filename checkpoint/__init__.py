"""Checkpoint files: reading (config, safetensors shards), writing atomically, the local registry.

Below both ``model`` and ``quant``: it knows the files' layout, not what the tensors compute.
"""
