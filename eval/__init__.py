"""Degradation operators, readouts, statistics and reports (installed as dipreg.eval)."""
