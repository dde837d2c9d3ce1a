"""peftbench: compare subset-selection parameter-efficient fine-tuning methods.

Architecture: `selection` + `selector` (the method contract; `api` gathers what an author
imports) -> `registry` (entry points) -> `data` (task specs) + `models` (encoders) -> `sparse`
(frozen-by-construction training) -> `trainer` -> `experiment` (seeds, run directories) ->
`sweep` (Optuna studies, score cache) -> `statistics` (numbers and frames) -> `findings` ->
`report` / `plots` / `pages` (rendering) -> `leaderboard` (+ `cellstore`) -> `cli`.
`ownership` and `safeload` guard what is deleted, overwritten and read back.
"""
from peftbench.selector import Budget, Selection, Selector, apportion, top_k

__version__ = "0.4.0"  # bump with any change that can move a number (it keys a study's cells)
__all__ = ["Budget", "Selection", "Selector", "apportion", "top_k"]
