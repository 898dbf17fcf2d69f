"""The Dask cluster of a volume job: the embedded ``LocalCluster`` (with the worker
environment the volume path wants), attaching to a running scheduler, and gathering
task results as they complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["DROPPED_WORKER_ENV", "EXTERNAL_WORKER_ENV", "connect", "gather", "local_cluster"]


#: Worker environment variables Dask's nanny sets by default that the volume path drops:
#: ``MALLOC_TRIM_THRESHOLD_`` switches off glibc's dynamic mmap threshold, so every
#: temporary over 128 KiB (a tile batch, a slice of probabilities) is mapped, faulted in
#: page by page and unmapped again: twice the page faults and 7-20 % slower prediction
#: (``benchmarks/volume.py``, ``worker_environment``). External ``dask worker`` processes
#: drop it when started with the environment in :data:`EXTERNAL_WORKER_ENV`.
DROPPED_WORKER_ENV = ("MALLOC_TRIM_THRESHOLD_",)


#: What to set for ``dask worker`` to start without :data:`DROPPED_WORKER_ENV`: Dask
#: merges configuration dicts, and a ``None`` value unsets one of the nanny's variables.
EXTERNAL_WORKER_ENV = {
    "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": repr(dict.fromkeys(DROPPED_WORKER_ENV))
}


def local_cluster(workers: int) -> Any:
    """The embedded ``LocalCluster``: ``workers`` processes of one thread each, no
    dashboard, started without :data:`DROPPED_WORKER_ENV` (the rest of Dask's
    ``distributed.nanny.pre-spawn-environ``, e.g. ``OMP_NUM_THREADS=1``, is kept)."""
    import dask
    from distributed import LocalCluster

    environ = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    kept = {k: v for k, v in environ.items() if k not in DROPPED_WORKER_ENV}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": kept}):
        return LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )


def connect(workers: int, scheduler: str | None) -> tuple[Any, Callable[[], None]]:
    from distributed import Client

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ValueError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
        return client, client.close
    cluster = local_cluster(workers)
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


def gather(
    client: Any, futures: list[Any], description: str, progress: bool, ordered: bool = False
) -> list[Any]:
    """Results of ``futures`` as they complete (in submission order with ``ordered``);
    a failure cancels the rest."""
    from distributed import as_completed

    from mitoseg.progress import progress_iter

    results: dict[int, Any] = {}
    position = {fut.key: i for i, fut in enumerate(futures)}
    try:
        for fut in progress_iter(as_completed(futures), len(futures), description, progress):
            results[position[fut.key]] = fut.result()
    except BaseException:
        client.cancel(futures)
        raise
    return [results[i] for i in sorted(results)] if ordered else list(results.values())
