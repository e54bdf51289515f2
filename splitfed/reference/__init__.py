"""Single-process references of each mode: what a split run must reproduce exactly."""
