"""bonefrac.registry."""
