"""Statistics over finished runs: the analysis frame, cell statistics, ranks, comparisons, uncertainty, checks, overlap."""
