"""bonefrac.inference."""
