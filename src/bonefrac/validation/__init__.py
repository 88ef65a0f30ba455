"""bonefrac.validation."""
