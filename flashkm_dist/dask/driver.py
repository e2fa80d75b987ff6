"""The distributed fit: placement, seeding and Lloyd on a Dask cluster, with checkpoints.

The driver places and reduces; it holds no numerics of its own. Seeding is `init` over `Points` whose shards are
the workers; a Lloyd iteration is a step task per worker, an exact reduction task and a scalars task. The next
iteration is queued before the client waits for this one's scalars (centres stay futures), so the client's round
trip hides behind the workers' compute; the queued step is exactly the final assignment when the fit stops.

Recovery is bounded by anchors. Dask recomputes a lost result from its graph, and each iteration's centres come
from the iteration before, back to the run's first centres: a lost reducer (or, chained, any lost worker) would
recompute the whole run so far. Every `ANCHOR_EVERY_S` the client takes the current centres into its own memory
and restarts the futures from tasks that carry them (`DaskShards.anchor`), under the same version names (so the
shards keep their labels), so a lost worker costs at most the iterations since the last anchor. An anchor costs
one wait of the client (that iteration is not queued ahead).
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.utils import check_random_state
from tqdm.auto import tqdm

from flashkm_dist import _validation as v
from flashkm_dist.dask import checkpoint as ckpt
from flashkm_dist.dask import latency, push
from flashkm_dist.dask import worker
from flashkm_dist.dask.cluster import DaskShards, Iteration
from flashkm_dist.init import initial_centers
from flashkm_dist.points import Points

MAX_INIT_ATTEMPTS = 3  # a worker lost while seeding restarts the seeding from the same random state
ITERATION_HOOKS: list = []  # callables(iteration) run after each iteration's scalars arrive (tests, instrumentation)
ANCHOR_EVERY_S = 60.0  # at most this long between anchors (see the module docstring)
PUSH = True  # steps and reductions push their results to the workers that take them next (`push`; A/B: False)
POLL_S = 0.5  # how often a chained fit waiting for scalars looks for a failed step


def get_client(client=None):
    if client is not None:
        return client
    from distributed import get_client as current
    try:
        return current()
    except ValueError:
        raise ValueError("fitting a Dask array needs a distributed.Client: create one (Client(), "
                         "Client(LocalCluster()), Client(scheduler_file=...)) or pass client=") from None


def prepare(X, sample_weight, dtype):
    """Validate and persist X (one column chunk, known row chunks) and the weights aligned to its chunks."""
    import dask.array as da
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D Dask array, got {X.ndim} dimension(s) (shape {X.shape})")
    if X.dtype.kind not in "fiub":
        raise ValueError(f"X must have a real numeric dtype, got {X.dtype}")
    if np.isnan(X.shape[1]) or X.shape[1] < 1:
        raise ValueError(f"X must have a known number of features >= 1, got shape {X.shape}")
    compute = v.parse_dtype(dtype) or (v.parse_dtype(X.dtype.name) if X.dtype.kind == "f" else torch.float64)
    if X.numblocks[1] != 1:
        X = X.rechunk({1: -1})
    X = X.persist()
    if any(np.isnan(n) for n in X.chunks[0]):
        X.compute_chunk_sizes()
    weights = None
    if sample_weight is not None:
        w = sample_weight if isinstance(sample_weight, da.Array) else da.from_array(np.asarray(sample_weight))
        if w.ndim != 1 or (not np.isnan(w.shape[0]) and w.shape[0] != X.shape[0]):
            raise ValueError(f"sample_weight must be 1-D with one entry per sample ({X.shape[0]}), got shape "
                             f"{w.shape}")
        weights = w.astype(np.float64).rechunk((X.chunks[0],)).persist()
        bad_finite, negative, positive = da.compute(~da.isfinite(weights).all(), (weights < 0).any(),
                                                    (weights > 0).any())
        if bad_finite:
            raise ValueError("sample_weight contains NaN or infinity")
        if negative:
            raise ValueError("sample_weight must be non-negative")
        if not positive:
            raise ValueError("sample_weight must have at least one positive entry (all weights are zero)")
    return X, weights, compute


@dataclass
class RunResult:
    centers: torch.Tensor
    inertia: float
    n_iter: int
    history: list = field(default_factory=list)


def _seed(init, points: Points, model, rng, seeding, shards: DaskShards):
    """Initial centres; a worker lost meanwhile (its seeding state with it) restarts from the same draws."""
    state = rng.get_state()
    for attempt in range(MAX_INIT_ATTEMPTS):
        try:
            return initial_centers(init, points, model.n_clusters, rng, seeding,
                                   oversampling_factor=model.oversampling_factor, tol=model.tol)
        except Exception as err:  # noqa: BLE001 - retried only when the cluster changed under us
            moved = shards.refresh() or isinstance(err, KeyError)  # KeyError: a shard without the block's state
            if not moved or attempt == MAX_INIT_ATTEMPTS - 1:
                raise
            rng.set_state(state)


def _record(i: int, s: dict, t0: float, history: list, bar, tol: float, max_iter: int, on_iteration,
            centres) -> tuple[bool, bool, float]:
    """Book iteration i's scalars (history, progress bar, checkpoint, hooks); returns (strict, done) by
    scikit-learn's stopping rules and when the iteration ended (the next one's time runs from there, so the
    client's work between iterations, checkpoints and anchors included, counts). `centres`: () -> the new and
    current centres, for the checkpoint."""
    ended = time.perf_counter()
    history.append({"iteration": i, "inertia": s["inertia"], "center_shift": s["shift"],
                    "labels_changed": s["n_changed"], "seconds": ended - t0,
                    "slowest_worker_seconds": s["slowest_worker_seconds"]})
    bar.update(1)
    bar.set_postfix(inertia=f"{s['inertia']:.6g}", shift=f"{s['shift']:.3g}")
    strict = s["n_changed"] == 0
    if on_iteration is not None:
        on_iteration(i, centres, history)
    for hook in ITERATION_HOOKS:
        hook(i)
    return strict, strict or s["shift"] <= tol or i == max_iter, ended


def lloyd(shards: DaskShards, centers: torch.Tensor, numerics, *, max_iter: int, tol: float, verbose: bool,
          desc: str, resume: ckpt.Resume | None = None, on_iteration=None) -> RunResult:
    """Lloyd iterations on the cluster with scikit-learn's stopping rules (see `lloyd.run_lloyd`)."""
    client, k = shards.client, centers.shape[0]
    history = [] if resume is None else list(resume.history)
    start = 1 if resume is None else resume.iteration + 1
    current = shards.anchor(centers)
    previous = None if resume is None or resume.previous is None else shards.anchor(resume.previous)
    names: dict = {}  # an anchor's key -> the version its centres had (the shards remember labels by it)

    def step_from(centres: list, before: list | None) -> Iteration:
        return shards.submit_step(numerics, k, centres, before, tuple(
            None if c is None else names.get(c[0].key, c[0].key) for c in (centres, before)))

    it = step_from(current, previous)
    bar = tqdm(total=max_iter, initial=start - 1, desc=desc, disable=not verbose, leave=False)
    strict, s, i = False, None, start - 1
    t0 = anchored_at = time.perf_counter()
    for i in range(start, max_iter + 1):
        anchoring = time.perf_counter() - anchored_at >= ANCHOR_EVERY_S
        following = None if anchoring else step_from(it.centres, current)  # speculative; the final step if we stop
        s = it.scalars.result()
        if s["n_empty"]:
            if following is not None:
                following.cancel(client)
            it = shards.submit_reseed(it, numerics, current, s["n_empty"])
            s = it.scalars.result()
            following = None if anchoring else step_from(it.centres, current)
        strict, done, t0 = _record(i, s, t0, history, bar, tol, max_iter, on_iteration,
                                   lambda: shards.gather(it.centres, current))
        if following is None and not done:  # the next steps start from centres held here
            held = shards.gather(it.centres, current)
            new, current = (_anchor(shards, names, c, values) for c, values in zip((it.centres, current), held))
            it, following = Iteration(it.steps, new, it.scalars), step_from(new, current)
            anchored_at = time.perf_counter()
        elif following is None:
            following = step_from(it.centres, current)
        if done:
            break
        shards.refresh()  # a worker came or went: the iterations queued from now on use the new placement
        # (the one already queued is left alone: Dask reruns a lost task elsewhere, and cancelling tasks while
        # workers come and go can forget keys the loop still waits for)
        current, it = it.centres, following  # (the step futures keep the centres they need alive)
    bar.close()
    final, = shards.gather(it.centres)
    if strict and s["shift"] == 0.0:  # no label changed and the centres did not move: this step's inertia
        inertia = s["inertia"]
        following.cancel(client)
    else:
        inertia = following.scalars.result()["inertia"]
    return RunResult(final, inertia, i, history)


def _anchor(shards: DaskShards, names: dict, centres: list, values: torch.Tensor) -> list:
    """`centres` (futures) as a task that carries their `values`, under their version name."""
    anchored = shards.anchor(values)
    names[anchored[0].key] = names.get(centres[0].key, centres[0].key)
    return anchored


class _Published:
    """Scalars the chained steps publish (iteration -> dict), and a wake-up for the loop waiting on them."""

    def __init__(self):
        self.got: dict = {}
        self.ready = threading.Event()

    def __call__(self, event) -> None:
        self.got.setdefault(event[1]["iteration"], event[1])
        self.ready.set()

    def wait(self, i: int, watched: list) -> dict:
        """Iteration i's scalars; a failed or cancelled task among `watched` (the steps that publish them) raises
        instead, seen within `POLL_S` (no callbacks on the steps: each would cost the scheduler's event loop, which
        the client's shares on a local cluster, work at the moment the next steps are sent)."""
        while True:
            self.ready.clear()
            if i in self.got:
                return self.got[i]
            failed = next((f for f in watched if f.status in ("error", "cancelled")), None)
            if failed is not None:
                failed.result()
            self.ready.wait(POLL_S)


def lloyd_chained(shards: DaskShards, centers: torch.Tensor, numerics, *, run: int, max_iter: int, tol: float,
                  verbose: bool, desc: str, resume: ckpt.Resume | None = None, on_iteration=None) -> RunResult:
    """`lloyd` with one task per worker and iteration (`worker.chained_step`: the update of the step before, then
    this worker's step), so an iteration costs one scheduler hop instead of two. Iteration i's scalars come from
    iteration i+1's steps, which publish them before stepping; the client keeps two iterations queued, so it
    never stalls the workers, and cancels them before they start when the fit stops. Same stopping rules, same
    bits as `lloyd`; empty clusters are re-seeded as there, and a new chain starts from the re-seeded centres."""
    client = shards.client
    history = [] if resume is None else list(resume.history)
    start = 1 if resume is None else resume.iteration + 1
    topic = shards._key("scalars", run)
    published = _Published()
    client.subscribe_topic(topic, published)
    current = shards.anchor(centers)
    previous = None if resume is None or resume.previous is None else shards.anchor(resume.previous)
    steps = {start: shards.start_chain(current, previous, current[0].key,
                                       None if previous is None else previous[0].key, numerics)}
    versions, explicit = {start: current[0].key}, {start: current}  # explicit: centres held as futures
    chain = [0]  # restarts (re-seeding): a version names one chain's centres, never a skipped chain's

    def queue_to(last: int) -> None:
        for j in range(max(steps) + 1, min(last, max_iter + 1) + 1):
            versions[j] = f"{topic}-{chain[0]}-{j}"
            steps[j] = shards.submit_chained(numerics, steps[j - 1], j, versions[j], versions[j - 1], topic)

    def centres_of(j: int) -> list:
        if j not in explicit:
            explicit[j] = [shards.step_centres(steps[j][0])]
        return explicit[j]

    def cancel_from(j: int) -> None:
        client.cancel([f for m in sorted(steps) if m >= j for f in steps.pop(m)])

    def anchor_at(j: int) -> Iteration:
        """Restart the chain at iteration j from centres held here: the update of steps j-1 as a reduction
        (its scalars are iteration j-1's), then plain steps from the anchored centres under the chain's names."""
        update = shards.submit_update(numerics, centers.shape[0], steps[j - 1], centres_of(j - 1))
        held = shards.gather(update.centres, centres_of(j - 1))
        explicit[j], explicit[j - 1] = (shards.anchor(values) for values in held)
        versions[j] = f"{topic}-{chain[0]}-{j}"
        steps[j] = shards.start_chain(explicit[j], explicit[j - 1], versions[j], versions[j - 1], numerics)
        return update

    bar = tqdm(total=max_iter, initial=start - 1, desc=desc, disable=not verbose, leave=False)
    strict, s, i = False, None, start - 1
    t0 = anchored_at = time.perf_counter()
    anchored: dict = {}  # iteration -> its update as a reduction (an anchor): its scalars come from there
    try:
        for i in range(start, max_iter + 1):
            anchoring = time.perf_counter() - anchored_at >= ANCHOR_EVERY_S
            queue_to(i + 1 if anchoring else i + 2)
            s = anchored.pop(i).scalars.result() if i in anchored else published.wait(i, steps[i + 1])
            if s["n_empty"]:  # the steps after have skipped: re-seed, and a new chain from the new centres
                cancel_from(i + 1)
                chain[0] += 1
                it = shards.submit_reseed(Iteration(steps[i], [], None), numerics, centres_of(i), s["n_empty"])
                s = it.scalars.result()
                explicit[i + 1], versions[i + 1] = it.centres, it.centres[0].key
                steps[i + 1] = shards.start_chain(it.centres, centres_of(i), versions[i + 1], versions[i],
                                                  numerics)
            strict, done, t0 = _record(i, s, t0, history, bar, tol, max_iter, on_iteration,
                                       lambda: shards.gather(centres_of(i + 1), centres_of(i)))
            if done:
                break
            if anchoring:
                anchored[i + 1], anchored_at = anchor_at(i + 2), time.perf_counter()
            shards.refresh()
            for m in [m for m in steps if m <= i]:  # (Dask keeps what the queued steps still need)
                del steps[m]
                explicit.pop(m, None)
        if strict and s["shift"] == 0.0:  # no label changed and the centres did not move: this step's inertia
            final, inertia = shards.gather(centres_of(i))[0], s["inertia"]
        else:
            final, = shards.gather(centres_of(i + 1))
            inertia = shards.chain_inertia(numerics, steps[i + 1]).result()
        cancel_from(i + 1)
    finally:
        bar.close()
        client.unsubscribe_topic(topic)
    return RunResult(final, inertia, i, history)


def lloyd_collective(shards: DaskShards, centers: torch.Tensor, numerics, *, run: int, max_iter: int, tol: float,
                     verbose: bool, desc: str, resume: ckpt.Resume | None = None, on_iteration=None) -> RunResult:
    """`lloyd` with the workers all-reducing among themselves: one task per worker runs the whole run (they stop
    together, as they all see the same scalars), so no Dask round trip sits between iterations. The client follows
    the progress that rank 0 publishes and only waits for the run's end; a failed task ends the wait."""
    client = shards.client
    start = 1 if resume is None else resume.iteration + 1
    channel = shards._key("progress", run)
    events: list = []
    client.subscribe_topic(channel, lambda event: events.append(event[1]))
    previous = None if resume is None or resume.previous is None else shards.anchor(resume.previous)[0]
    past = [] if resume is None else list(resume.history)
    tasks = shards.submit_run(numerics, run, start, shards.anchor(centers)[0], previous, max_iter, tol, past,
                              on_iteration, channel)
    bar = tqdm(total=max_iter, initial=start - 1, desc=desc, disable=not verbose, leave=False)
    shown, checked = 0, time.perf_counter()
    try:
        while True:
            finished = all(t.done() for t in tasks) or any(t.status == "error" for t in tasks)
            for h in events[shown:]:
                bar.update(1)
                bar.set_postfix(inertia=f"{h['inertia']:.6g}", shift=f"{h['center_shift']:.3g}")
                for hook in ITERATION_HOOKS:
                    hook(h["iteration"])
            shown = len(events)
            if finished:
                break
            if time.perf_counter() - checked > 0.5 and shards.refresh():
                raise RuntimeError("a worker left or joined during an allreduce='nccl' fit; a collective cannot "
                                   "recover from that (the others stop at their collective timeout): refit, or "
                                   "use allreduce='dask', which does")
            checked = checked if time.perf_counter() - checked <= 0.5 else time.perf_counter()
            time.sleep(0.02)
        out = client.gather(tasks)[0]  # raises the first failure
    finally:
        client.unsubscribe_topic(channel)
        bar.close()
    return RunResult(out["centers"].centers, out["inertia"], out["n_iter"], out["history"])


def _runs(model, shards: DaskShards, X, dtype, n_init: int, collective: bool):
    """The fit's n_init runs (resumed from the checkpoint when asked): the best run and the seeding numerics."""
    points = Points(shards)
    rng = check_random_state(model.random_state)
    seeding = points.numerics(model.metric)
    fingerprint = ckpt.fingerprint(model, X, dtype, seeding)
    saved = ckpt.read(model.checkpoint, fingerprint) if model.resume else None
    best = None if saved is None else saved.best
    first_run = 0 if saved is None else saved.run
    if saved is not None:
        rng.set_state(saved.rng_state)
    for run in range(first_run, n_init):
        resume = saved if saved is not None and run == saved.run and saved.iteration > 0 else None
        if resume is None:
            centers = _seed(model.init, points, model, rng, seeding, shards)
            max_abs = float(centers.abs().max())
        else:
            centers, max_abs = resume.centers, resume.centroid_max_abs
        numerics = points.numerics(model.metric, centroid_max_abs=max_abs)
        writer = None if model.checkpoint is None else ckpt.Writer(model.checkpoint, fingerprint, run,
                                                                   rng.get_state(), max_abs, best)
        kwargs = dict(max_iter=model.max_iter, tol=model.tol * numerics.mean_variance,
                      verbose=bool(model.verbose), desc=f"k-means run {run + 1}/{n_init}", resume=resume,
                      on_iteration=writer)
        if collective:
            result = lloyd_collective(shards, centers, numerics, run=run, **kwargs)
        elif shards.chained:
            result = lloyd_chained(shards, centers, numerics, run=run, **kwargs)
        else:
            result = lloyd(shards, centers, numerics, **kwargs)
        if best is None or result.inertia < best.inertia:
            best = result
        if writer is not None:
            writer.run_done(best, n_init)
    return best, seeding


def fit(model, X, sample_weight=None, client=None, allreduce: str = "auto"):
    """Fit `model` (a flashkm_dist.KMeans) on the Dask array X. See the module docstring. `allreduce`: 'dask'
    (reduction tasks), 'chained' (`lloyd_chained`), 'auto' (chained on a few workers of one host, see
    `DaskShards.suits_chaining`, else 'dask'); all survive lost workers. 'nccl': the workers all-reduce among
    themselves (see `collective`)."""
    if allreduce not in ("auto", "dask", "chained", "nccl"):
        raise ValueError(f"allreduce must be 'auto', 'dask', 'chained' or 'nccl', got {allreduce!r}")
    client = get_client(client)
    if model.checkpoint is None and model.resume:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    X, weights, dtype = prepare(X, sample_weight, model.dtype)
    n_init = model._check_params(int(X.shape[0]))
    model.n_features_in_ = int(X.shape[1])
    spec = worker.ShardSpec(uuid.uuid4().hex, model.device, str(dtype).removeprefix("torch."),
                            model.metric == "cosine", bounds=model.bounded)
    shards = DaskShards(client, X, weights, spec, dtype)
    shards.chained = shards.chained or allreduce == "chained" or (allreduce == "auto" and shards.suits_chaining())
    collective = allreduce == "nccl"
    pushing = PUSH and not collective
    with latency.Tightened(client):  # no message batching while the fit runs
        try:
            if collective:
                shards.start_collective()
            if pushing:
                push.install(client)
            best, seeding = _runs(model, shards, X, dtype, n_init, collective)
        finally:
            if collective:
                shards.stop_collective()
            if pushing:
                push.uninstall(client)
            shards.forget()
    return best, seeding, dtype, X
