"""YAML recipes of the training arms (installed as dipreg.recipes)."""
