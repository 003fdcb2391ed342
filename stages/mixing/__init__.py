"""Mixing: the methods by name (methods), per-sample draws, partners and ratios (ratios), masks and
losers (masks: torch), and the encoder actor's decisions for a unit (decide). Torch-free to import:
the driver and the CPU tasks check a configuration with methods and ratios."""
