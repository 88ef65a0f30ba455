"""bonefrac.monitoring."""
