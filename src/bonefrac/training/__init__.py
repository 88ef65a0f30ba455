"""bonefrac.training."""
