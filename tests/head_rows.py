"""Counting what the lm_head projects: the logits-at-positions tests read it."""

from __future__ import annotations

from typing import Self


class HeadRows:
    """Records how many rows each lm_head call projects while the block runs."""

    def __init__(self, model) -> None:
        self.calls: list[int] = []
        self.handle = model.lm_head.register_forward_hook(
            lambda _module, args, _out: self.calls.append(args[0].shape[:-1].numel()))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()
