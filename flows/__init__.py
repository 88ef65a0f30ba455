"""Thin Prefect flows over bonefrac library functions, one per pipeline stage."""
