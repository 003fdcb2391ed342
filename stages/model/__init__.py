"""The saliency tower: constants, settings (tower), configs and hub repos, weights, the factory and
the merging encoder. Torch-free to import: only factory and encoder load torch."""
