"""Running bonefrac's scheduled operations: the Prefect worker entry and the healing of dead runs.

``worker`` starts a Prefect process worker in the project's own environment and
stops it promptly; ``sweep`` marks runs whose process died as Crashed (freeing the
deployment's concurrency slot); ``zombies`` installs the server-side automation
that does the same from missing heartbeats, for workers on other machines.
"""
