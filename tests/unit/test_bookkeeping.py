"""Bookkeeping after bad input and kills (issue 16): stale MLflow runs are closed, plan logging
survives an invalid UTF-8 row."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from raydapt.ops.plan import _domain_ids, sample_texts


def test_plan_sampling_survives_an_invalid_utf8_row(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"".join([
        json.dumps({"id": "a", "text": "first", "domain": "x"}).encode() + b"\n",
        b'{"id": "b", "text": "bad \xff\xfe byte", "domain": "x"}\n',
        json.dumps({"id": "c", "text": "third", "domain": "y"}).encode() + b"\n"]))
    texts = sample_texts(p, "text")
    assert texts[0] == "first" and texts[-1] == "third" and len(texts) == 3
    assert _domain_ids(p, "domain", "id") == {"x": ["a", "b"], "y": ["c"]}


@pytest.mark.timeout(300)
def test_runs_of_a_sigkilled_job_are_closed_by_the_next_run(tmp_path):
    """A driver SIGKILLed inside a stage leaves its parent and stage runs RUNNING; the next run
    of the same job (same run name, same experiment) marks them KILLED. A live run is left be."""
    from mlflow.tracking import MlflowClient

    from raydapt.core.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    kw = dict(enabled=True, uri=uri, experiment="e", artifact_location=str(tmp_path / "art"))
    killed = textwrap.dedent(f"""
        import os, signal
        from raydapt.core.tracking import Tracker
        t = Tracker(**{kw!r})
        with t.job("job"), t.child("teacher"):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == -9, p.stderr[-2000:]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("e")

    def status() -> dict[str, str]:
        return {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id])}

    assert status() == {"job": "RUNNING", "teacher": "RUNNING"}
    old = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    t = Tracker(**kw)
    with t.job("other"):  # another job's runs are not touched
        pass
    assert status()["job"] == "RUNNING"
    with t.job("job") as parent:
        assert {client.get_run(i).info.status for i in old} == {"KILLED"}
        mine = client.get_run(parent.run_id)
        assert mine.info.status == "RUNNING"
        with Tracker(**kw).job("job"):  # a concurrent run of the same job: this one is alive
            assert client.get_run(parent.run_id).info.status == "RUNNING"


def test_an_identical_run_waits_for_the_ray_train_storage_lock(tmp_path):
    """Issue 28: two identical runs at once shared one Ray Train run (same name, same storage);
    the second failed on the other's checkpoint files. The second now waits on a lock, with a
    message, and the lock dies with its holder, even a SIGKILLed one."""
    import os
    import signal


    lock = tmp_path / "train" / ".student-abc.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from raydapt.core.runtime import exclusive
        with exclusive({str(lock)!r}, "Ray Train run student-abc"):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            from raydapt.core.runtime import exclusive
            with exclusive({str(lock)!r}, "Ray Train run student-abc"):
                print("got it", flush=True)
        """)], stdout=subprocess.PIPE, text=True, start_new_session=True)
        first = waiter.stdout.readline()
        assert first.startswith(f"raydapt: Ray Train run student-abc is in use by pid "
                                f"{holder.pid} on "), first
        assert "waiting for it to finish" in first
        assert waiter.poll() is None  # still waiting while the holder lives
        os.killpg(holder.pid, signal.SIGKILL)  # the holder dies without unlocking
        holder.wait(timeout=60)
        rest = waiter.communicate(timeout=120)[0]
        assert "is free; going on" in rest and rest.rstrip().endswith("got it")
        assert waiter.returncode == 0
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)


@pytest.mark.timeout(600)
def test_sigterm_after_ray_init_unwinds_like_ctrl_c(tmp_path):
    """Issue 28: SIGTERM to a driver inside ray.get ended it with rc 134 and a crash dump of
    Ray's C++ core ('*** SIGTERM received ... Aborted'), its MLflow runs FAILED. It now raises
    Terminated (a KeyboardInterrupt) in the main thread: the runs are marked KILLED and the
    process exits cleanly (ray.get re-raises it as a plain KeyboardInterrupt; ``terminated()``
    tells the two apart, as the CLI does). (The whole-job version, with the CLI's message and the
    resume: tests/recipes/test_resume_and_faults.py, in the teacher pass and in the student's fit.)"""
    import os
    import signal
    import time

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    code = textwrap.dedent(f"""
        import sys, time
        import ray
        from raydapt.core.runtime import handle_sigterm, init_ray, terminated
        from raydapt.core.tracking import Tracker
        handle_sigterm()
        for attempt in range(6):  # an overloaded machine can time Ray's start-up out
            try:
                init_ray(num_cpus=1, progress=False)
                break
            except Exception:
                time.sleep(5)

        @ray.remote
        def slow():
            time.sleep(600)

        t = Tracker(enabled=True, uri={uri!r}, experiment="e",
                    artifact_location={str(tmp_path / "art")!r})
        try:
            with t.job("job"), t.child("teacher"):
                print("READY", flush=True)
                ray.get(slow.remote())
        except KeyboardInterrupt:  # ray.get re-raises our Terminated as a KeyboardInterrupt
            if terminated():
                print("terminated cleanly", flush=True)
                sys.exit(143)
    """)
    log = tmp_path / "out.log"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while "READY" not in log.read_text():
            assert p.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        time.sleep(2)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert "terminated cleanly" in text and "SIGTERM received" not in text, text[-3000:]
    cl = MlflowClient(tracking_uri=uri)
    runs = cl.search_runs([cl.get_experiment_by_name("e").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {"job": "KILLED",
                                                              "teacher": "KILLED"}
