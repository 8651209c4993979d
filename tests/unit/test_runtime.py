"""raydapt.core.runtime: the local Ray instance's worker set-up hook."""

from __future__ import annotations

import logging

from raydapt.core.runtime import quiet_worker_logs

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
NOISE = ("Failed to query Ray Train Controller actor state. State API may be temporarily "
         "unavailable. Continuing to monitor.")


def test_quiet_worker_logs_drops_only_the_cleaner_state_api_warning(caplog):
    log = logging.getLogger(CLEANER)
    before = list(log.filters)
    try:
        quiet_worker_logs()
        with caplog.at_level(logging.WARNING, logger=CLEANER):
            log.warning(NOISE)
            log.warning("Failed to clean up placement group: boom")
        assert [r.getMessage() for r in caplog.records] == [
            "Failed to clean up placement group: boom"]
    finally:
        log.filters[:] = before


def test_local_ray_workers_run_the_hook(ray_local):
    ray = ray_local

    @ray.remote
    def filters() -> list[str]:
        return [type(f).__name__ for f in logging.getLogger(CLEANER).filters]

    assert "_DropNoStateApi" in ray.get(filters.remote())


def test_the_cleaner_thread_crash_is_not_printed():
    """Several Ray instances on one machine: Ray Train's PlacementGroupCleaner monitor thread
    dies with 'Found multiple active Ray instances' and printed a traceback per fit (issue 16).
    The hook passes every other thread's crash on to the previous excepthook."""
    import threading

    saved, seen = threading.excepthook, []
    try:
        threading.excepthook = lambda args: seen.append(args.thread.name)
        quiet_worker_logs()

        def boom() -> None:
            raise ConnectionError("Found multiple active Ray instances")

        for name in ("PlacementGroupCleanerMonitor", "other-thread"):
            t = threading.Thread(target=boom, name=name)
            t.start()
            t.join()
        assert seen == ["other-thread"]
    finally:
        threading.excepthook = saved
