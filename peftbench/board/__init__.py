"""Leaderboards: a committed board folder, its phases (search, carry, per-budget, grid), its tables, verification and re-keying."""
