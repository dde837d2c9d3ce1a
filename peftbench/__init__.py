"""peftbench: compare subset-selection parameter-efficient fine-tuning methods.

A method author imports `peftbench.api` (and tests with `peftbench.testing`); everything else
is the harness, in layers that import only downwards (`docs/reference/layout.md`): `core` ->
`data` -> `modeling` -> `contract` -> `training` -> `sweep` -> `analysis` -> `rendering` ->
`board` -> `bench` -> `cli`.
"""

__version__ = "0.4.0"  # bump with any change that can move a number (it keys a study's cells)
