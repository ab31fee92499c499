"""Mixed-precision recipes: which layers keep more bits (placeholder, filled from measurements)."""

RECIPES = {}
