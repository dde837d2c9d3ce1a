"""What a method author writes against: the `Selector` contract, what `score` reads, the run's training settings, and the registry that finds methods. Depends on no training or runner code."""
