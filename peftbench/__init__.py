"""peftbench: compare subset-selection parameter-efficient fine-tuning methods.

Architecture: `selector` (the method contract) -> `registry` (entry points) -> `data` (task
specs) + `models` (encoders) -> `sparse` (frozen-by-construction training) -> `trainer` ->
`experiment` (seeds, run directories) -> `sweep` (Optuna studies, score cache) -> `report` /
`plots` -> `leaderboard` -> `cli`.
"""
from peftbench.selector import Budget, Selection, Selector, apportion, top_k

__version__ = "0.3.0"  # bump with any change that can move a number (it keys a study's cells)
__all__ = ["Budget", "Selection", "Selector", "apportion", "top_k"]
