"""The generation queue shared by every session of a studio: turns between sessions, positions,
per-image progress, cancel, batches shared between compatible requests, and isolation: each session
gets exactly the images it would get alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from ui_support import register, save_lora

from studio.generation.queue import CANCELLED, DONE, FAILED, GenerationQueue
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate, pipeline_for

PROMPT = "a red circle on a blue background"


def _px(image) -> np.ndarray:
    return np.asarray(image)


class _Gate:
    """A ``pipeline_for`` that holds the worker at its first job until opened, so the test can queue
    jobs behind it and read their order."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.calls = 0

    def __call__(self, request):
        self.calls += 1
        self.opened.wait(60)
        return pipeline_for(request)


@pytest.fixture
def gated():
    gate = _Gate()
    queue = GenerationQueue(pipeline_for=gate)
    yield queue, gate
    gate.opened.set()
    queue.close()


def _request(prompt=PROMPT, **kwargs) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, **{"num_inference_steps": 4, "seed": 1, **kwargs})


def test_sessions_take_turns_and_see_their_position(gated):
    queue, gate = gated
    a1 = queue.submit(_request(seed=1), "alice")
    a2 = queue.submit(_request(seed=2, num_inference_steps=5), "alice")
    a3 = queue.submit(_request(seed=3, num_inference_steps=6), "alice")
    b1 = queue.submit(_request(seed=4, num_inference_steps=7), "bob")
    # alice sent three before bob sent one: bob's runs second, not fourth
    assert [queue.position(j) for j in (a1, b1, a2, a3)] == [0, 1, 2, 3]
    assert [j.id for j in queue.jobs("alice")] == [a1.id, a2.id, a3.id]
    gate.opened.set()
    for job in (a1, a2, a3, b1):
        assert queue.wait(job, 120) and job.state == DONE, job.error
    assert queue.position(a1) is None
    # finished in turn order: each job's images came from its own request
    assert b1.result.seeds == [4] and a3.result.seeds == [3]


def test_two_sessions_with_different_stacks_get_exactly_what_each_gets_alone(reg, tmp_path):
    register(reg, "warm", save_lora(tmp_path, seed=0))
    register(reg, "cold", save_lora(tmp_path, seed=1))
    queue = GenerationQueue()
    requests = {
        "alice": _request(seed=5, num_images=3, adapters=[{"ref": "warm@1", "weight": 0.9}]),
        "bob": _request("a green square", seed=5, num_images=2, adapters=[{"ref": "cold@1", "weight": 1.0}]),
    }
    jobs = {}
    threads = [threading.Thread(target=lambda s=s: jobs.__setitem__(s, queue.submit(requests[s], s)))
               for s in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in jobs.values():
        assert queue.wait(job, 120) and job.state == DONE, job.error
    try:
        for session, job in jobs.items():
            alone = generate(requests[session])
            assert job.result.seeds == alone.seeds
            assert [a.name for a in job.result.outputs[0].request.adapters] == [
                "warm" if session == "alice" else "cold"]
            for mine, theirs in zip(job.result.images, alone.images):
                assert np.array_equal(_px(mine), _px(theirs))
            assert job.image_fractions() == [1.0] * requests[session].num_images
    finally:
        queue.close()
        from adapters.compose import engine_for

        engine_for(pipeline_for(_request())[0]).unload_all()  # the shared pipeline stays clean


def test_compatible_requests_share_a_batch_and_each_image_replays_alone(gated):
    queue, gate = gated
    blocker = queue.submit(_request(num_inference_steps=2), "first")
    others = [queue.submit(_request(prompt, seed=seed, num_images=n), session)
              for prompt, seed, n, session in (("a blue square", 40, 2, "s1"), ("a red circle", 0, 1, "s2"),
                                               ("a green triangle", 90, 3, "s3"))]
    odd = queue.submit(_request(seed=7, num_inference_steps=5), "s4")  # other steps: a batch of its own
    gate.opened.set()
    for job in (blocker, *others, odd):
        assert queue.wait(job, 120) and job.state == DONE, job.error
    assert [job.shared_with for job in others] == [2, 2, 2] and odd.shared_with == 0
    rows = [(o.request.batch_size, o.request.batch_index, o.seed) for job in others for o in job.result.outputs]
    assert rows == [(6, 0, 40), (6, 1, 41), (6, 2, 0), (6, 3, 90), (6, 4, 91), (6, 5, 92)]
    # s2's image sat at row 2 with seed 0: its replay fills the rows before it with wrapped seeds, the
    # rows after with its own neighbours; a row's numbers depend only on the batch's size
    for job, k in ((others[1], 0), (others[2], 2), (others[0], 1)):
        again = generate(job.result.outputs[k].request)
        assert np.array_equal(_px(again.images[0]), _px(job.result.images[k]))


def test_cancel_a_queued_job_and_a_running_one(gated):
    queue, gate = gated
    running = queue.submit(_request(num_inference_steps=400), "alice")
    queued = queue.submit(_request(seed=9), "bob")
    assert queue.cancel(queued) and queued.state == CANCELLED and queue.position(queued) is None
    gate.opened.set()
    deadline = time.monotonic() + 120
    while running.image_steps[0] < 2 and not running.finished and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.state == "running"
    assert queue.cancel(running)
    assert queue.wait(running, 120) and running.state == CANCELLED and running.result is None
    assert running.image_steps[0] < 400  # stopped at a step, not at the end
    assert not queue.cancel(running)  # already finished
    after = queue.submit(_request(seed=11), "bob")  # the worker goes on
    assert queue.wait(after, 120) and after.state == DONE


def test_a_failing_job_reports_its_error_and_the_worker_goes_on(reg):
    queue = GenerationQueue()
    try:
        bad = queue.submit(_request(adapters=[{"ref": "nothing-here@1", "weight": 1.0}]), "alice")
        good = queue.submit(_request(seed=3), "alice")
        assert queue.wait(good, 120) and good.state == DONE
        assert bad.state == FAILED and "nothing-here" in bad.error
    finally:
        queue.close()
