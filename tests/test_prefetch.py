"""Jobs sent ahead (a worker's ``--prefetch``): a worker is sent a job beyond its slots while a
backlog waits, so that the next job starts as one ends; such a job waits there for a slot, and a
worker that drains gives it back at once (it goes to another worker; the attempt is not held
against the job)."""

from __future__ import annotations

from tests.helpers import check_filtered, frame_png, push, ref, slow, wait_completed, wait_until, workload


def worker_entry(system, token, name: str) -> dict:
    return next(w for w in system.get("/status", token)["workers"] if w["name"] == name)


def test_a_workers_next_job_waits_there_and_starts_as_one_ends(make_system):
    system = make_system("--hedge", "off")
    token = system.start_workers({"one": ("--capacity", "1", *slow(300))})
    assert worker_entry(system, token, "one")["prefetch"] == 1  # a quarter of its slots, at least one
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 48, 32) for i in range(6)}
    push(system, token, wid, frames)
    # One job running, one sent ahead waiting there for the slot (the rest at the server).
    seen = []

    def waiting() -> bool:
        seen.append(worker_entry(system, token, "one"))
        return seen[-1]["waiting_jobs"] == 1 and seen[-1]["running_jobs"] == 1

    wait_until(waiting, 30, "a job waiting on the worker beside the one it runs", interval=0.02)
    wait_completed(system.url, token, wid, timeout=60)
    assert all(w["running_jobs"] <= w["capacity"] for w in seen), seen  # running means running
    check_filtered(system, token, wid, frames)
    assert system.get("/status", token)["scheduler"]["sent_ahead"] >= 1
    jobs = ref.get_json(system.url, token, f"/workloads/{wid}/jobs")
    assert all(j["attempts"] == 1 and j["copies"] == 1 for j in jobs), jobs


def test_without_prefetch_a_worker_holds_only_what_it_runs(make_system):
    system = make_system("--hedge", "off")
    token = system.start_workers({"one": ("--capacity", "1", "--prefetch", "0", *slow(200))})
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 48, 32) for i in range(5)}
    push(system, token, wid, frames)
    seen = set()

    def done() -> bool:
        w = worker_entry(system, token, "one")
        seen.add(w["running_jobs"] + w["waiting_jobs"])
        return ref.get_json(system.url, token, f"/workloads/{wid}")["status"] == "completed"

    wait_until(done, 60, "the workload to complete", interval=0.02)
    check_filtered(system, token, wid, frames)
    assert max(seen) <= 1 and system.get("/status", token)["scheduler"]["sent_ahead"] == 0


def one_running_one_waiting(system, name: str) -> tuple[str, str, dict[int, bytes]]:
    """A one-slot worker ``name`` of 5 s jobs, running one job with another waiting on it (and
    a third queued); (token, workload id, frames)."""
    token = system.start_workers({name: ("--capacity", "1", *slow(5000))})
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 48, 32) for i in range(3)}
    push(system, token, wid, frames)
    wait_until(lambda: worker_entry(system, token, name)["waiting_jobs"] == 1, 30,
               "a job waiting on the worker beside the one it runs", interval=0.02)
    return token, wid, frames


def test_a_draining_worker_gives_its_waiting_job_back_at_once(make_system):
    system = make_system("--hedge", "off")
    token, wid, frames = one_running_one_waiting(system, "leaving")
    system.start_workers({"staying": ()})
    assert system.stop_worker("leaving") == 0  # drains: finishes the job it runs, gives back the other
    wait_completed(system.url, token, wid, timeout=60)
    check_filtered(system, token, wid, frames)
    jobs = ref.get_json(system.url, token, f"/workloads/{wid}/jobs")
    by = sorted(j["worker"] for j in jobs)
    assert by == ["leaving", "staying", "staying"], jobs
    assert all(j["state"] == "done" for j in jobs)
    running, waiting = (next(j for j in jobs if j["image_id"] == i) for i in (0, 1))
    # The job that waited went elsewhere as the drain began, not once the running one ended.
    assert running["worker"] == "leaving" and waiting["worker"] == "staying"
    assert waiting["dispatched_at"] < running["finished_at"], jobs


def test_a_worker_killed_with_a_job_running_and_one_waiting_loses_neither(make_system):
    system = make_system("--hedge", "off")
    token, wid, frames = one_running_one_waiting(system, "doomed")
    system.start_workers({"survivor": ()})
    doomed = system.workers.pop("doomed")
    doomed.kill()  # SIGKILL: nothing said, both its jobs must come back
    doomed.wait(10)
    wait_completed(system.url, token, wid, timeout=60)
    check_filtered(system, token, wid, frames)
    jobs = ref.get_json(system.url, token, f"/workloads/{wid}/jobs")
    assert all(j["state"] == "done" and j["worker"] == "survivor" for j in jobs), jobs
