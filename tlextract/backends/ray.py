"""``run --backend ray``: one Ray task per (experiment, trait, variant), run by a pool of actors.

Each actor holds one device slot (a GPU, a fraction of one, or some CPUs) and keeps every model it
loads for the later tasks it runs, so a model is loaded once per actor, not once per trait.
Tasks write where the local backend writes (the experiment directory, which every node must see at
the same path) through the same fingerprinted, atomic stages. So a task whose actor dies is retried
by Ray on the restarted actor and resumes at its first missing shard, and rerunning the command
skips finished stages without loading a model. Out-of-memory inside a batch halves the batch and
retries it (``memory.HalvingBatches``, as on the local backend).

Ray is an optional dependency (``pip install 'tlextract[ray]'``); nothing here imports it until a
run asks for this backend.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import torch

from tlextract.engines.registry import starts_server
from tlextract.errors import TLExtractError
from tlextract.evaluation.crossval import HEADLINE, cross_validate
from tlextract.model.decoding import Model
from tlextract.model.memory import GiB, default_budget
from tlextract.settings import STAGES, RunSettings, experiment_report_dir
from tlextract.stages.common import model_loader
from tlextract.stages.run import is_done, release, run_trait, starts_vllm_server
from tlextract.store import META, write_json, write_text

# A killed actor (crash, node lost, host out of memory) is restarted and its task retried this
# many times; a task that still fails is reported as failed and the others go on.
RETRIES = 3
TASK_LOG = "ray_task.log"
# Idle actors by (Ray job, GPUs, CPUs): a later call in the same Ray session reuses them and the
# models they hold. They end with the session (ray.shutdown(), or this process exiting).
_IDLE: dict[tuple[str, float, float], list[Any]] = {}


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise TLExtractError(
            "--backend ray needs Ray: pip install 'tlextract[ray]' (or: make traits backend=ray)."
        ) from None
    return ray


def task_name(run: RunSettings) -> str:
    return f"{run.experiment.name}/{run.trait.name}/{run.variant}"


def _stage_stamps(run: RunSettings) -> dict[str, int | None]:
    """Modification time of each stage's meta.json: a stage whose stamp changed ran again."""
    stamps: dict[str, int | None] = {}
    for stage in STAGES:
        meta = run.stage_dir(stage) / META
        stamps[stage] = meta.stat().st_mtime_ns if meta.exists() else None
    return stamps


def _mean_diff_best(run: RunSettings) -> tuple[int | None, str | None]:
    """The mean_diff layer to use and its cross-validated AUROC: the result card's figures
    (:func:`tlextract.evaluation.crossval.cross_validate`, read back when the task or a report
    already wrote them). Computed by the driver from the files the task wrote, after the task."""
    try:
        cv = cross_validate(run, [HEADLINE])
    except TLExtractError as e:  # e.g. too few kept examples, or outputs not readable here
        print(f"[ray] {task_name(run)}: no cross-validated figures: {e}")
        return None, None
    return cv.layer[HEADLINE], str(cv.get(HEADLINE).auroc)


@contextmanager
def _log_to(stream: TextIO) -> Iterator[None]:
    """The library's log records into the task's log file while the task runs."""
    logger = logging.getLogger("tlextract")
    handler, level = logging.StreamHandler(stream), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class TraitWorker:
    """A Ray actor (see :func:`run_on_ray`): runs trait tasks on its device, one at a time.
    ``gpus`` is the share of GPUs it holds (0: none, and it sees none; 0.5: half of one)."""

    def __init__(self, threads: int, gpus: float = 0.0):
        torch.set_num_threads(threads)
        self.gpus = gpus
        self.models: dict[tuple[str, str, str | None, str], Model] = {}

    def run(self, run: RunSettings, stages: Sequence[str]) -> dict[str, Any]:
        """One trait run; its output goes to ``<out_dir>/ray_task.log`` (appended per attempt)."""
        import ray

        gpus = ray.get_gpu_ids()
        if not gpus:  # Ray hides no GPU from an actor that holds none: never load onto one
            run = replace(run, device=run.device or "cpu")
        device = run.device or f"gpu {','.join(map(str, gpus))}"
        host = socket.gethostname()
        key = (run.model, run.model_backend, run.device, run.dtype)
        loaded = False
        if starts_vllm_server(run, stages):  # it asks for most of the GPU: the kept models go
            self.models.clear()
            release()

        def get_model() -> Model:
            nonlocal loaded
            if key not in self.models:
                self.models[key] = model_loader(run)()
                loaded = True
            return self.models[key]

        run = self._gpu_share(run, stages, get_model)

        log = run.out_dir / TASK_LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        before, start = _stage_stamps(run), time.perf_counter()
        # Line-buffered, so a process killed mid-task still leaves its log up to the last line.
        with open(log, "a", buffering=1) as f, redirect_stdout(f), redirect_stderr(f), _log_to(f):
            now = datetime.now().isoformat(timespec="seconds")
            print(f"=== {task_name(run)}: attempt at {now} on {host} ({device}), pid {os.getpid()}")
            try:
                vectors = run_trait(run, stages, get_model)
            except BaseException:
                traceback.print_exc()  # into the task's log; Ray also reports it to the caller
                raise
            after = _stage_stamps(run)
            ran = [s for s in STAGES if after[s] != before[s]]
            print(f"=== finished, stages run: {', '.join(ran) or 'none (up to date)'}")
        return {
            "experiment": run.experiment.name,
            "trait": run.trait.name,
            "variant": run.variant,
            "model": run.model,
            "status": "done",
            "stages_run": ran,
            "loaded_model": loaded,
            "kept": None
            if vectors is None
            else {"pos": vectors.metadata["n_pos"], "neg": vectors.metadata["n_neg"]},
            "best_layer": None,  # filled in by the driver (run_on_ray)
            "crossval_auroc": None,
            "wall_s": round(time.perf_counter() - start, 2),
            "device": device,
            "host": host,
            "pid": os.getpid(),
            "log": str(log),
        }

    def _gpu_share(
        self, run: RunSettings, stages: Sequence[str], get_model: Callable[[], Model]
    ) -> RunSettings:
        """With part of a GPU, --batch-size auto budgets that part of the free memory (the
        default gives every actor on the GPU 80% of the same free memory): measured after the
        weights are on it, except before a vLLM server (which must start beside no model)."""
        if not 0 < self.gpus < 1 or run.batch_size != "auto" or run.memory_budget_gib is not None:
            return run
        if all(is_done(run, s) for s in stages):
            return run  # nothing to run: no model to load
        device = run.device or "cuda"
        if not starts_vllm_server(run, stages):
            device = str(get_model().cfg.device)
        return replace(run, memory_budget_gib=self.gpus * default_budget(device) / GiB)


def _failed(run: RunSettings, error: BaseException) -> dict[str, Any]:
    cause = getattr(error, "cause", None) or error  # a RayTaskError wraps the task's exception
    return {
        "experiment": run.experiment.name,
        "trait": run.trait.name,
        "variant": run.variant,
        "model": run.model,
        "status": "failed",
        "error": f"{type(cause).__name__}: {cause}".strip().splitlines()[0],
        "log": str(run.out_dir / TASK_LOG),
    }


def run_on_ray(
    runs: Sequence[RunSettings],
    stages: Sequence[str] = STAGES,
    *,
    address: str | None = None,
    gpus_per_task: float | None = None,
    cpus_per_task: float = 1.0,
) -> list[dict[str, Any]]:
    # long: one scheduling loop over shared state (idle actors, pending and running tasks, rows)
    """Run every (experiment, trait, variant) in ``runs`` as a Ray task; returns one summary row
    per run, in the order of ``runs``, and writes ``<experiment>/report/ray_summary.{md,json}``.

    Connects to ``address`` (a running cluster, e.g. ``ray://head:10001`` or ``auto``), or uses the
    Ray session this process already started, or starts a local one. ``gpus_per_task`` defaults to
    1 where the cluster has GPUs and 0 otherwise (0.5 puts two actors on each GPU)."""
    if gpus_per_task is not None:
        check_tensor_parallel(runs, gpus_per_task)  # before Ray starts and prints its banner
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address)
    cluster = ray.cluster_resources()
    gpus = gpus_per_task if gpus_per_task is not None else (1.0 if cluster.get("GPU") else 0.0)
    if gpus > cluster.get("GPU", 0) or cpus_per_task > cluster.get("CPU", 0):
        raise TLExtractError(
            f"each task asks for {gpus:g} GPU and {cpus_per_task:g} CPU, but the Ray cluster has "
            f"{cluster.get('GPU', 0):g} GPU and {cluster.get('CPU', 0):g} CPU in all; lower "
            "--gpus-per-task / --cpus-per-task."
        )
    check_tensor_parallel(runs, gpus)
    slots = int(cluster["GPU"] // gpus) if gpus else int(cluster["CPU"] // cpus_per_task)
    # Ray sets CUDA_VISIBLE_DEVICES only for actors that hold a GPU: the others would see all.
    hidden = {} if gpus else {"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
    worker = ray.remote(num_gpus=gpus, num_cpus=cpus_per_task, max_restarts=RETRIES,
                        max_task_retries=RETRIES, **hidden)(TraitWorker)  # fmt: skip
    threads = max(1, int(cpus_per_task))
    pool = (ray.get_runtime_context().get_job_id(), gpus, cpus_per_task)
    idle = _IDLE.pop(pool, [])
    idle += [worker.remote(threads, gpus) for _ in range(min(slots, len(runs)) - len(idle))]
    print(
        f"[ray] {len(runs)} tasks on {len(idle)} actors ({gpus:g} GPU, {cpus_per_task:g} CPU "
        f"each); each task logs to <results>/{TASK_LOG}"
    )
    pending = list(enumerate(runs))
    running: dict[Any, tuple[Any, int]] = {}  # object ref -> (actor, index of the run)
    rows: dict[int, dict[str, Any]] = {}
    while pending or running:
        while idle and pending:
            actor, (i, run) = idle.pop(), pending.pop(0)
            running[actor.run.remote(run, list(stages))] = (actor, i)
            print(f"[ray] {task_name(run)} queued, log: {run.out_dir / TASK_LOG}")
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, i = running.pop(ref)
        try:
            rows[i] = ray.get(ref)
        except ray.exceptions.RayError as e:
            rows[i] = _failed(runs[i], e)
            if isinstance(e, ray.exceptions.RayActorError):  # out of restarts: use a new one
                actor = worker.remote(threads, gpus)
        idle.append(actor)
        row = rows[i]
        what = (
            f"done in {row['wall_s']:.1f} s on {row['host']} ({row['device']})"
            if row["status"] == "done"
            else f"FAILED: {row['error']}"
        )
        failed = sum(r["status"] == "failed" for r in rows.values())
        print(
            f"[ray] {task_name(runs[i])} {what} | {len(rows) - failed} done, {len(running)} "
            f"running, {failed} failed, {len(pending)} waiting | log: {row['log']}"
        )
    _IDLE[pool] = idle
    for i, row in rows.items():
        if row["status"] == "done" and row["kept"] is not None:
            row["best_layer"], row["crossval_auroc"] = _mean_diff_best(runs[i])
    ordered = [rows[i] for i in range(len(runs))]
    for path in write_summaries(runs, ordered):
        print(f"[ray] summary -> {path}")
    return ordered


def check_tensor_parallel(runs: Sequence[RunSettings], gpus: float) -> None:
    """A vLLM server a task starts splits the model over tensor_parallel_size GPUs: no more
    than the task holds."""
    for run in runs:
        tp = run.engine.tensor_parallel_size
        if starts_server(run.engine) and tp > 1 and tp > gpus:
            raise TLExtractError(
                f"engine.tensor_parallel_size {tp} ({run.experiment.path / 'experiment.json'}): "
                f"each Ray task holds {gpus:g} GPU; use --gpus-per-task {tp} or a "
                "tensor_parallel_size of at most the GPUs per task."
            )


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| trait | variant | kept pos/neg | use layer | cross-validated AUROC | stages run "
        "| wall s | device | status |\n|---|---|---|---:|---|---|---:|---|---|\n"
    )
    lines = []
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['trait']} | {r['variant']} | | | | | | | failed: {r['error']} |")
            continue
        kept = f"{r['kept']['pos']}/{r['kept']['neg']}" if r["kept"] else ""
        lines.append(
            f"| {r['trait']} | {r['variant']} | {kept} | {_cell(r['best_layer'])} "
            f"| {_cell(r['crossval_auroc'])} | {', '.join(r['stages_run']) or 'up to date'} "
            f"| {r['wall_s']:.1f} | {r['host']} {r['device']} | done |"
        )
    return head + "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def write_summaries(runs: Sequence[RunSettings], rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Print the summary table and write it per experiment (markdown and JSON)."""
    paths = []
    for exp in {run.experiment.path: run.experiment for run in runs}.values():
        mine = [r for run, r in zip(runs, rows, strict=True) if run.experiment.path == exp.path]
        text = summary_markdown(mine)
        print(text, end="")
        out = experiment_report_dir(exp)
        write_text(out / "ray_summary.md", f"# Ray run of {exp.name}\n\n{text}")
        write_json(out / "ray_summary.json", mine)
        paths += [out / "ray_summary.md", out / "ray_summary.json"]
    return paths
