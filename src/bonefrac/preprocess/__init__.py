"""bonefrac.preprocess."""
