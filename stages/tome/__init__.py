"""Token Merging: the algorithm (merge), its schedule, and its adapter to open_clip's blocks (openclip)."""
