"""The one channel between a model's MoE layers and whoever else has a stake in their routed experts.

Every MoE layer holds its model's ``ExpertChannel`` and calls it where ``MoE.forward`` shows it:
``routed`` once the router has chosen (an expert store counts hits and starts bringing in the next
layer's likely experts; a routing observer, such as the trace recorder, writes the choice down),
then ``run`` for each chosen expert, which is the layer's own module unless an expert store holds
the experts. Nothing else (no hook, no attribute on the model) connects a store to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Protocol

import torch
from torch import nn

from dsmoe.model.layer_plan import weights_changed

RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called as ``observer(layer_idx, expert_ids [N, k], weights [N, k])`` by every MoE layer."""

GuessObserver = Callable[[int, torch.Tensor], None]
"""Called as ``observer(layer_idx, guessed_ids [N, k])`` when an expert store guesses a layer's
routing before that layer runs (its prefetch), so that a trace can replay the prefetch too."""


class ExpertHolder(Protocol):
    """What holds a model's routed experts in place of its layers (``dsmoe.offload.ExpertStore``)."""

    def routed(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Layer ``layer`` routes its tokens ``x`` [N, hidden] to ``ids`` [N, k]; its experts run next."""

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` of ``layer`` on its tokens ``x``."""


class NativeExpertHolder(ExpertHolder, Protocol):
    """A holder that also feeds the native decode step (optional: without these methods, layers
    whose experts it holds run their modules)."""

    def serves_native(self, layer: int, top_k: int) -> bool:
        """Whether ``native_experts`` can name a decode step's ``top_k`` experts of ``layer`` at once."""

    def native_experts(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> Sequence[NativeExpert]:
        """``routed`` for one token, then the chosen experts ``ids`` [1, k] as the native decode step
        runs them, in ``ids``' order; they stay where they are until the layer's experts have run."""

    def served_experts(self, layer: int, experts: Sequence[int]) -> Sequence[nn.Module] | None:
        """The modules of ``experts`` (this pass's, ascending) when ``routed`` brought the layer's whole
        pass into slots, so that a prefill may run them in one native call as resident experts run;
        None when each must come through ``run``."""


class NativeExpert(Protocol):
    """What the native decode step needs of an expert (``quant.linear.SwiGLUKernel``)."""

    kind: tuple[object, ...]
    addresses: tuple[int, ...]


class ExpertChannel:
    """Who runs a model's routed experts, and who is told of each routing decision."""

    def __init__(self) -> None:
        self.holder: ExpertHolder | None = None
        self.observer: RoutingObserver | None = None
        self.guess_observer: GuessObserver | None = None

    def hold(self, holder: ExpertHolder | None) -> None:
        """Hand the routed experts to ``holder`` (None: back to the layers' own modules).

        The native decode plans read the layers' own experts, so they are made stale.
        """
        self.holder = holder
        weights_changed()

    def routed(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """A MoE layer's routing, before its experts run."""
        if self.holder is not None:
            self.holder.routed(layer, x, ids)
        self.observe(layer, ids, weights)

    def observe(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Tell the observer; the native decode step calls only this (it runs only without a holder)."""
        if self.observer is not None:
            self.observer(layer, ids, weights)

    def guessed(self, layer: int, ids: torch.Tensor) -> None:
        """The holder's guess of ``layer``'s next routing, made before the layer runs."""
        if self.guess_observer is not None:
            self.guess_observer(layer, ids)
