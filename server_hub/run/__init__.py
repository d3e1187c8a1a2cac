"""What the hub decides for a run (the run spec, kept in its state dir) and how the run is
judged on real data (a held-out image folder, per-class accuracy, confusion matrix)."""
