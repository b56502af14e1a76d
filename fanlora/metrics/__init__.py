"""Task metrics, each pinned by tests to hand-computed cases (the task suite's scoring rules)."""
