"""peftbench: compare subset-selection parameter-efficient fine-tuning methods.

Architecture: `selector` (the method contract) -> `registry` (entry points) -> `data` (task
specs) + `models` (encoders) -> `sparse` (frozen-by-construction training) -> `trainer` ->
`experiment` (seeds, run directories) -> `sweep` (Optuna studies, score cache) -> `report` /
`plots` -> `leaderboard` -> `cli`.
"""
from peftbench.selector import Budget, Selection, Selector, top_k

__version__ = "0.2.0"
__all__ = ["Budget", "Selection", "Selector", "top_k"]
