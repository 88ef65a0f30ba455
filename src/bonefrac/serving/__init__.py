"""bonefrac.serving."""
