"""A time limit on the Brendel-Bethge trust-region solver, which can loop forever.

Foolbox's Brendel-Bethge attacks (Brendel et al. 2019) take each step by solving, per sample, a
small constrained problem with a Numba-compiled optimizer. On rare inputs that optimizer never
returns: its inner search for the Lagrange multiplier can stall at floating-point resolution
(reported upstream as bethgelab/foolbox#583, open). We met it on biDIM's Fashion-MNIST dim42:
the L-inf attack through one sigmoid surrogate stopped at step 427 on one image, and the run sat
there for hours at full CPU. Compiled code cannot be interrupted from Python, so
:class:`WatchedSolver` runs the solver in a forked worker process and kills the worker when one
solve exceeds its time limit. The stalled sample takes no step (a zero update, as Foolbox does for
converged samples) for the rest of the attack, so it keeps the best adversarial found before, and
the other samples continue unchanged. Each abandoned sample is reported through an
:class:`AttackStalledWarning`.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import pickle
import warnings
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import numpy as np

__all__ = [
    "AttackStalledWarning",
    "Solver",
    "WatchedSolver",
    "stalled_positions",
    "watched_solver",
]

UPSTREAM_ISSUE = "bethgelab/foolbox#583"


class AttackStalledWarning(RuntimeWarning):
    """An attack's solver exceeded its time limit on some samples; their search stopped there.

    ``originals`` holds those samples' clean inputs (flattened), for
    :func:`stalled_positions`.
    """

    def __init__(self, message: str, originals: Sequence[np.ndarray] = ()) -> None:
        super().__init__(message)
        self.originals = list(originals)


class Solver(Protocol):
    """The interface of Foolbox's Brendel-Bethge optimizers (``attack._optimizer``)."""

    def solve(
        self,
        x0: np.ndarray,
        x: np.ndarray,
        b: np.ndarray,
        min_: float,
        max_: float,
        c: float,
        r: float,
    ) -> np.ndarray: ...


def _serve(solver: Solver, connection: Connection) -> None:
    """The worker: solve each request until the parent sends None or goes away."""
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            connection.send(("ok", solver.solve(*request)))
        except Exception as error:  # returned to the parent, which raises it there
            connection.send(("error", error))


def _compile_in_this_process(solver: Solver, x0: np.ndarray, *request: Any) -> None:
    """Solve a two-pixel problem with the argument types the worker gets, in this process.

    Numba compiles a solver on its first call for the argument types it gets (dtype, layout,
    whether an array is read-only), half a minute to a minute per norm here, and a forked
    worker inherits what the parent compiled: without this, every fresh worker would compile
    again, on the clock of its first request. The worker receives the request through a pipe,
    pickled: Foolbox's read-only views arrive as writable, contiguous arrays, so the types are
    taken after the same round trip (and fresh arrays of those dtypes match them).
    """
    x0, x, b, min_, max_, c, r = pickle.loads(pickle.dumps((x0, *request)))
    span = max_ - min_
    middle = min_ + span / 2
    solver.solve(
        np.array([middle, middle], dtype=x0.dtype),
        np.array([middle + 0.2 * span, middle + 0.1 * span], dtype=x.dtype),
        np.ones(2, dtype=b.dtype),
        min_,
        max_,
        type(c)(-0.1 * span),
        type(r)(0.5 * span),
    )


def _key(original: np.ndarray) -> bytes:
    """The identity of one clean input, independent of its dtype and shape."""
    values = np.ascontiguousarray(original, dtype=np.float64).ravel()
    return hashlib.blake2b(values.tobytes(), digest_size=16).digest()


class WatchedSolver:
    """``solver.solve`` in a worker process, abandoned after ``timeout`` seconds per call.

    A call that times out kills the worker (a fresh one serves the next call) and returns a zero
    step; later calls for the same original (``x0``) return a zero step at once. ``stalled``
    lists those originals. Where the platform cannot fork, calls run in this process, unwatched.
    """

    def __init__(self, solver: Solver, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.solver = solver
        self.timeout = timeout
        self.stalled: list[np.ndarray] = []
        self._stalled_keys: set[bytes] = set()
        self._worker: BaseProcess | None = None
        self._connection: Connection | None = None
        self._can_fork = "fork" in multiprocessing.get_all_start_methods()
        self._warmed = False

    def solve(self, x0: np.ndarray, *request: Any) -> np.ndarray:
        """The solver's step for one sample (the arguments of :meth:`Solver.solve`), or a zero
        step if it stalled on this original."""
        if not self._can_fork:
            return self.solver.solve(x0, *request)
        key = _key(x0)
        if key in self._stalled_keys:
            return np.zeros_like(x0)
        if not self._warmed:
            _compile_in_this_process(self.solver, x0, *request)
            self._warmed = True
        connection = self._connect()
        connection.send((x0, *request))
        if not connection.poll(self.timeout):
            self._stop_worker(kill=True)
            self._stalled_keys.add(key)
            self.stalled.append(np.array(x0, copy=True))
            return np.zeros_like(x0)
        status, payload = connection.recv()
        if status == "error":
            raise payload
        step: np.ndarray = payload
        return step

    def _connect(self) -> Connection:
        if self._connection is None:
            parent_end, worker_end = multiprocessing.Pipe()
            worker = multiprocessing.get_context("fork").Process(
                target=_serve, args=(self.solver, worker_end), daemon=True
            )
            worker.start()
            worker_end.close()
            self._worker, self._connection = worker, parent_end
        return self._connection

    def _stop_worker(self, *, kill: bool) -> None:
        connection, worker = self._connection, self._worker
        self._connection = self._worker = None
        if connection is not None:
            if not kill:
                with contextlib.suppress(OSError):
                    connection.send(None)
            connection.close()
        if worker is not None:
            if kill:
                worker.kill()
            worker.join(timeout=10)
            if worker.is_alive():  # pragma: no cover - a worker that ignores None
                worker.kill()
                worker.join()

    def close(self) -> None:
        """Stop the worker process (a later call starts a new one)."""
        self._stop_worker(kill=False)


def stalled_positions(stalled: Sequence[np.ndarray], batch: np.ndarray) -> list[int]:
    """Positions in ``batch`` (N x ...) of the ``stalled`` originals (compared by value)."""
    keys = {_key(original) for original in stalled}
    return [i for i, sample in enumerate(batch) if _key(sample) in keys]


@contextlib.contextmanager
def watched_solver(attack: Any, timeout: float | None) -> Iterator[None]:
    """Run ``attack`` (a Foolbox Brendel-Bethge attack) with its solver under a time limit.

    On exit, an :class:`AttackStalledWarning` carries the originals whose solve was abandoned.
    With ``timeout`` None the attack runs as it is.
    """
    if timeout is None:
        yield
        return
    unwatched = attack._optimizer
    watched = WatchedSolver(unwatched, timeout)
    attack._optimizer = watched
    try:
        yield
    finally:
        attack._optimizer = unwatched
        watched.close()
    if watched.stalled:
        warnings.warn(
            AttackStalledWarning(
                f"Foolbox's trust-region solver did not return within {timeout:g} s on "
                f"{len(watched.stalled)} sample(s) ({UPSTREAM_ISSUE}); their search stopped "
                "there, each keeping the best adversarial found before",
                watched.stalled,
            ),
            stacklevel=3,
        )
