"""Generated data sets for `sample-data`: the demo pictures (demo) and scenes with ground truth (scenes)."""
