"""One run: training, evaluation, the checks around a method's calls, run records, the score cache, forgetting, memory and identities."""
