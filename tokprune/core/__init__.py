"""The engine: budgets, sequence compaction, masks, positions and statistics."""
