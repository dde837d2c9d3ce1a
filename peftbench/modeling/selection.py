"""`Selection`: which pre-trained entries train. Its own module so that `selector` (the
contract) and `sparse` (the training engine) both use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Selection:
    """Which pre-trained entries train.

    `full`: names of parameters trained whole; `partial`: name -> sorted flat indices of the
    entries trained in that parameter. Names are those of `model.named_parameters()` before
    `apply`. `notes`: figures a method reports with its selection (written to selection.json).
    """

    full: set[str] = field(default_factory=set)
    partial: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def count(self, numels: dict[str, int]) -> int:
        return sum(numels[n] for n in self.full) + sum(len(i) for i in self.partial.values())

    def per_tensor(self, numels: dict[str, int]) -> dict[str, int]:
        counts = {n: numels[n] for n in self.full}
        counts.update({n: len(i) for n, i in self.partial.items()})
        return {n: counts.get(n, 0) for n in numels}

    def mask(self, name: str, shape: torch.Size) -> torch.Tensor:
        """Boolean mask of `name`'s trainable entries (for analysis and tests)."""
        mask = torch.zeros(shape, dtype=torch.bool)
        if name in self.full:
            mask[...] = True
        elif name in self.partial:
            mask.view(-1)[self.partial[name]] = True
        return mask
