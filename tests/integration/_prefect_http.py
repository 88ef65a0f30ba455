"""HTTP to a test's Prefect server, with the retries Prefect's own client makes.

Prefect's server answers 503 to errors a client may retry (for example a SQLite
database locked while the worker, the event persister and a test all write), and
Prefect's client retries 429/502/503 with backoff. Bare ``httpx`` calls do not:
on a busy CI machine one such answer became a failed test (a ``create_flow_run``
whose body had no ``id``). The tests use Prefect's client class, so they talk to
the server the way the worker and the CLI do, and still assert every status code
themselves (``raise_on_all_errors=False``).
"""

from __future__ import annotations

from prefect.client.base import PrefectHttpxSyncClient


def prefect_http() -> PrefectHttpxSyncClient:
    """An HTTP client for absolute Prefect API URLs that retries what Prefect's client retries."""
    return PrefectHttpxSyncClient(timeout=30, raise_on_all_errors=False)
