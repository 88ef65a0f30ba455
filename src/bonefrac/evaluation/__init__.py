"""bonefrac.evaluation."""
