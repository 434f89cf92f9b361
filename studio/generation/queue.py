"""One generation queue for every session of a studio process, run by a worker thread beside it.

Browser sessions (and any other caller) :meth:`GenerationQueue.submit` requests and get a :class:`Job`
back at once: its state, its place in the queue and each image's steps are read from it while a page
reruns, so no page ever waits on the GPU. What the worker runs next is fair between sessions: they
take turns (the session served least recently goes first), and each session's own requests run in
the order it sent them. A queued job can be cancelled; a running one stops at the next denoising step.

Requests with the same base model, adapter stack and sampling settings (:meth:`Prepared.batch_key`:
prompts and seeds may differ) share denoising batches: the worker takes the next job and fills the
rest of its batch with compatible jobs further back. That is exact because a row's numbers depend on
its batch's size, not on the other rows; each image's recipe records the batch's size and its row,
and re-makes it alone. Everything else about a job is its own: its adapters are applied under the
pipeline's lock for its batch only, its seeds and images go to it alone.

Pipelines come from the library's cache (``pipeline_for``): one per base model and precision.

Does not hold: running requests (``studio.generation.run``), the pages that show jobs (``studio.app.ui``).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from studio.core.errors import StudioError
from studio.generation.requests import GenerationRequest, one_line
from studio.generation.results import GenerationResult
from studio.generation.run import (
    GenerationCancelled,
    Prepared,
    batch_size_for,
    generate_prepared,
    pipeline_for,
    prepare,
)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


@dataclass(eq=False)
class Job:
    """One request in the queue: read by the page that sent it, written by the worker."""

    request: GenerationRequest
    session: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = QUEUED
    submitted_at: float = field(default_factory=time.time)
    steps: int = 0  # denoising steps each image runs (img2img runs fewer than asked); 0 until it starts
    image_steps: list[int] = field(default_factory=list)  # steps done, per image
    result: GenerationResult | None = None
    error: str | None = None
    shared_with: int = 0  # other jobs whose images shared its denoising batches
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _prepared: Prepared | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def image_fractions(self) -> list[float]:
        """Each image's progress, 0 to 1."""
        return [done / self.steps if self.steps else 0.0 for done in self.image_steps]

    def fraction(self) -> float:
        fractions = self.image_fractions()
        return sum(fractions) / len(fractions) if fractions else 0.0


class GenerationQueue:
    """A FIFO with turns between sessions, batched where the numbers allow, served by one worker thread
    (started with the first job; a daemon, so a process can always exit)."""

    def __init__(self, pipeline_for=pipeline_for, keep_finished: int = 200) -> None:
        self._pipeline_for = pipeline_for
        self._keep_finished = keep_finished
        self._cond = threading.Condition()
        self._waiting: list[Job] = []  # in submission order
        self._running: list[Job] = []
        self._finished: list[Job] = []
        self._served: dict[str, int] = {}  # session -> the turn it was last served at
        self._turn = 0
        self._worker: threading.Thread | None = None
        self._closed = False

    # ---- what sessions call -------------------------------------------------------------------

    def submit(self, request: GenerationRequest, session: str) -> Job:
        """Queue ``request`` for ``session`` (any stable text: a browser session's id, a user's name)."""
        if not isinstance(request, GenerationRequest):
            raise TypeError("submit a GenerationRequest")
        job = Job(request=request, session=session, image_steps=[0] * request.num_images)
        with self._cond:
            if self._closed:
                raise StudioError("the generation queue is closed: restart the studio")
            self._waiting.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="generation-queue", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        return job

    def position(self, job: Job) -> int | None:
        """How many queued jobs run before ``job`` (0: it is next); ``None`` once it runs or finished."""
        with self._cond:
            order = self._fair_order()
        return order.index(job) if job in order else None

    def cancel(self, job: Job) -> bool:
        """Cancel ``job``: a queued one leaves the queue now, a running one stops at its next step.
        False when it had already finished."""
        with self._cond:
            if job.finished:
                return False
            job._cancel.set()
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, CANCELLED)
            return True

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return next((j for j in (*self._waiting, *self._running, *self._finished) if j.id == job_id), None)

    def jobs(self, session: str | None = None) -> list[Job]:
        """Queued and running jobs (of ``session``, or all), in the order they will run."""
        with self._cond:
            jobs = [*self._running, *self._fair_order()]
        return [j for j in jobs if session is None or j.session == session]

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until ``job`` finished (for the command line and tests; pages poll instead)."""
        with self._cond:
            return self._cond.wait_for(lambda: job.finished, timeout)

    def close(self) -> None:
        """Cancel what is queued and stop the worker after its current batch."""
        with self._cond:
            self._closed = True
            for job in list(self._waiting):
                job._cancel.set()
                self._finish(job, CANCELLED)
            self._waiting.clear()
            self._cond.notify_all()

    # ---- the order ----------------------------------------------------------------------------

    def _fair_order(self) -> list[Job]:
        """The queued jobs in the order they will run: sessions take turns, the one served least recently
        first (a new session counts as never served; ties go to the earlier request); each session's jobs
        in the order it sent them. Called with the lock held."""
        pending: dict[str, list[Job]] = {}
        for job in self._waiting:
            pending.setdefault(job.session, []).append(job)
        served = dict(self._served)
        turn = self._turn
        order = []
        while pending:
            session = min(pending, key=lambda s: (served.get(s, -1), pending[s][0].submitted_at))
            order.append(pending[session].pop(0))
            if not pending[session]:
                del pending[session]
            served[session] = turn
            turn += 1
        return order

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state, job.error = state, error
        if job in self._running:
            self._running.remove(job)
        self._finished.append(job)
        del self._finished[:-self._keep_finished]
        self._cond.notify_all()

    # ---- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._closed)
                if self._closed:
                    return
                order = self._fair_order()
            head = order[0]
            try:
                pipe, model_hash, recommended = self._pipeline_for(head.request)
                group = self._group(head, order[1:], pipe, recommended)
            except Exception as e:  # noqa: BLE001 - a job's failure must not stop the worker
                with self._cond:
                    if head in self._waiting:
                        self._waiting.remove(head)
                        self._finish(head, FAILED, _message(e))
                continue
            if group:
                self._run(group, pipe, model_hash, recommended)

    def _prepared(self, job: Job, pipe, recommended) -> Prepared:
        if job._prepared is None:
            job._prepared = prepare(pipe, job.request, recommended)
        return job._prepared

    def _group(self, head: Job, others: list[Job], pipe, recommended) -> list[Job]:
        """``head`` and the queued jobs that can share its batches (prepared outside the lock: resolving
        adapters reads the registry), taken off the queue together; [] if ``head`` left the queue."""
        first = self._prepared(head, pipe, recommended)
        candidates = []
        key = first.batch_key()
        if key is not None:
            room = batch_size_for(pipe, first.request) - first.request.num_images
            for job in others:
                r = job.request
                if room < r.num_images or (r.base_model, r.precision) != (head.request.base_model,
                                                                          head.request.precision):
                    continue
                try:
                    if self._prepared(job, pipe, recommended).batch_key() == key:
                        candidates.append(job)
                        room -= r.num_images
                except StudioError:
                    continue  # its own turn reports the problem
        with self._cond:
            group = [job for job in (head, *candidates) if job in self._waiting]
            if not group or group[0] is not head:
                return []
            for job in group:
                self._waiting.remove(job)
                self._running.append(job)
                job.state = RUNNING
                job.shared_with = len(group) - 1
                self._served[job.session] = self._turn
                self._turn += 1
            self._cond.notify_all()
        return group

    def _run(self, group: list[Job], pipe, model_hash: str, recommended) -> None:
        def on_step(owner: int, images: list[int], step: int, steps: int) -> None:
            job = group[owner]
            job.steps = steps
            for i in images:
                job.image_steps[i] = step

        try:
            results = generate_prepared(pipe, [job._prepared for job in group], model_hash, recommended,
                                        on_step=on_step, cancelled=lambda owner: group[owner].cancel_requested)
        except GenerationCancelled:
            results = [None]
        except Exception as e:  # noqa: BLE001 - reported on every job of the batch, the worker goes on
            with self._cond:
                for job in group:
                    self._finish(job, FAILED, _message(e))
            return
        with self._cond:
            for job, result in zip(group, results):
                if result is None:
                    self._finish(job, CANCELLED)
                else:
                    job.result = result
                    self._finish(job, DONE)


def _message(error: Exception) -> str:
    if isinstance(error, StudioError):
        return str(error)
    return f"unexpected error ({type(error).__name__}: {one_line(error)}); the request was not run"
