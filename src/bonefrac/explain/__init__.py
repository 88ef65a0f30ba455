"""bonefrac.explain."""
