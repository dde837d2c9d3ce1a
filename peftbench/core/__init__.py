"""The floor: errors, YAML, safe loading, file ownership, digests and the one atomic writer. Imports nothing else of peftbench."""
