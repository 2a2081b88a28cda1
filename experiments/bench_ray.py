"""Ray measurements on the demo pools (`make bench`): where the merge happens and what a search
costs.

For each pool size (micro, small), with a real local Ray cluster:

1. Merge to model: time from a recipe to its merged weights inside the evaluation
   model's parameters — in one process (`merge_state_dict` + `ResidentModel.load_tensors`)
   against the Ray path with 1 and 2 shard workers (the workers' own figure: shard
   merges, object-store transfer and the copy into the model).
2. Search throughput: trials per minute of `recycler search` with 1 and 2
   evaluation workers (same study, same sampler seed, Ray already running).
3. Disk: bytes the whole process tree (driver, Ray's processes and workers) caused
   to be written to storage during each search (Linux /proc/PID/io write_bytes,
   polled), against the size of the study's SQLite file; and the same search with
   the SQLite file on a RAM disk (/dev/shm, whose writes reach no storage), so the
   difference between the two is what the study's storage wrote.

4. Many drivers (with a PostgreSQL server in RECYCLER_TEST_POSTGRES_URL, as
   `make bench` provides where it can): trials per minute of one `recycler search`
   process against two on one PostgreSQL study (one evaluation worker each), and the
   SQL writes per trial a search sends to SQLite and to PostgreSQL.

Writes experiments/results/bench_ray.md and .json, bench_drivers.md and .json. Usage:
    python experiments/bench_ray.py [--sizes micro small] [--trials 12] [--repeats 5]
        [--drivers-pool small] [--drivers-trials 16] [--only-drivers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import psutil
import torch
from sqlalchemy import event, text

from recycler.config import load_study_spec

ROOT = Path(__file__).resolve().parent.parent
POOLS = ROOT / "experiments" / "_pools"
RESULTS = ROOT / "experiments" / "results"
RAM_DISK = Path("/dev/shm")  # tmpfs on Linux: what is written there reaches no storage
# A PostgreSQL server for the many-driver figures (.ci/with-postgres sets it).
POSTGRES_ENV = "RECYCLER_TEST_POSTGRES_URL"


class TreeWrites:
    """Bytes written to storage by this process and every descendant, polled while it runs.

    A process's counter is kept at its last reading, so one that exits mid-run still counts.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self._last: dict[tuple[int, float], int] = {}
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._base = self._read()

    def _read(self) -> dict[tuple[int, float], int]:
        me = psutil.Process()
        out: dict[tuple[int, float], int] = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                out[(proc.pid, proc.create_time())] = proc.io_counters().write_bytes
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._last.update(self._read())

    def __enter__(self) -> TreeWrites:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._read())

    @property
    def written(self) -> int:
        return sum(v - self._base.get(k, 0) for k, v in self._last.items())


def uniform_recipe(zoo: Path, dtype: str) -> dict[str, Any]:
    ckpts = sorted(p for p in (zoo / "checkpoints").iterdir() if p.is_dir())
    return {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0 / len(ckpts)}} for p in ckpts],
        "dtype": dtype,
    }


def merge_in_one_process(zoo: Path, dtype: str, repeats: int) -> float:
    from recycler.evaluate.model import ResidentModel
    from recycler.merge.engine import merge_state_dict
    from recycler.merge.recipe import DTYPES, Recipe
    from recycler.pool import Pool
    from recycler.pool.safetensors_file import torch_dtype

    recipe = Recipe.from_dict(uniform_recipe(zoo, dtype))
    pool = Pool.open([m.model for m in recipe.models])
    model = ResidentModel(zoo / "base", dtype=torch_dtype(DTYPES[dtype]))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model.load_tensors(merge_state_dict(pool, recipe))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first also maps the files


def merge_on_ray(zoo: Path, dtype: str, shard_workers: int, repeats: int) -> float:
    from recycler.cluster.evaluator import RayEvaluator
    from recycler.cluster.worker import WorkerConfig
    from recycler.evaluate.tasks import folder_request
    from recycler.merge.recipe import Recipe

    recipe = uniform_recipe(zoo, dtype)
    cfg = WorkerConfig(
        checkpoints=tuple(m["model"] for m in recipe["models"]),
        base=str(zoo / "base"),
        model_dir=str(zoo / "base"),
        suite=folder_request(zoo / "tasks", ["zoo_inc"]),
        limit=4,
        batch_size=32,
        dtype=dtype,
    )
    ev = RayEvaluator(
        cfg,
        address=None,
        n_workers=1,
        gpus_per_worker=0,
        shard_workers=shard_workers,
        merge_method="linear",
    )
    try:
        times = []
        for i in range(repeats + 1):
            ev.submit(i, Recipe.from_dict(recipe), "dev")
            [(_, result)] = ev.wait()
            if not result.ok:
                raise RuntimeError(result.error)
            times.append(result.merge_seconds)
        return statistics.median(times[1:])
    finally:
        ev.close()


def write_study(
    zoo: Path, work: Path, name: str, storage: str, trials: int, eval_workers: int
) -> Path:
    """The zoo's study, written in `work`: paths absolute, its own name, storage and budget,
    one baseline (the uniform soup)."""
    zoo_study = load_study_spec(zoo / "study.yaml").relocated()
    bench = zoo_study.model_copy(
        update={
            "name": name,
            "storage": storage,
            "eval": zoo_study.eval.model_copy(update={"tasks_dir": zoo_study.task_dirs}),
            "search": zoo_study.search.model_copy(
                update={"n_trials": trials, "baselines": ["uniform"]}
            ),
            "cluster": zoo_study.cluster.model_copy(update={"eval_workers": eval_workers}),
        }
    )
    return bench.write(work / "study.yaml")


def search(
    zoo: Path, eval_workers: int, trials: int, storage_dir: Path | None = None
) -> dict[str, Any]:
    """One search from scratch; its SQLite file in its own folder, or in `storage_dir`."""
    from recycler.commands.search import run_search

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    db = (storage_dir or work) / f"bench-ray-{os.getpid()}-{eval_workers}.db"
    try:
        study = write_study(
            zoo, work, f"bench-{eval_workers}", f"sqlite:///{db}", trials, eval_workers
        )
        with TreeWrites() as writes:
            start = time.perf_counter()
            run_search(study, trials)
            wall = time.perf_counter() - start
        return {
            "eval_workers": eval_workers,
            "trials": trials,
            "wall_s": round(wall, 2),
            "trials_per_min": round(trials / wall * 60, 1),
            "bytes_written_tree": writes.written,
            "storage_bytes": db.stat().st_size,
            "storage_in_ram": storage_dir is not None,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        db.unlink(missing_ok=True)


def drivers_throughput(zoo: Path, storage: str, n_drivers: int, trials: int) -> dict[str, Any]:
    """`n_drivers` `recycler search` processes, started together on one study, one
    evaluation worker each. Trials per minute over the span from the first trial's start
    to the last one's end (each process's own Ray start-up is before it)."""
    from recycler.search.budget import counts_toward_budget

    work = Path(tempfile.mkdtemp(prefix="bench-drivers-"))
    name = f"bench-drivers-{n_drivers}-{os.getpid()}-{time.time_ns()}"
    try:
        study = write_study(zoo, work, name, storage, trials, eval_workers=1)
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "recycler.cli", "search", str(study)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            for _ in range(n_drivers)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"recycler search failed: {err.decode()[-2000:]}")
        wall = time.perf_counter() - start
        stored = optuna.load_study(study_name=name, storage=storage).get_trials()
        counted = [t for t in stored if counts_toward_budget(t)]
        begin = min(t.datetime_start for t in counted if t.datetime_start is not None)
        end = max(t.datetime_complete for t in counted if t.datetime_complete is not None)
        span = (end - begin).total_seconds()
        return {
            "drivers": n_drivers,
            "trials_counted": len(counted),
            "trials_stored": len(stored),
            "span_s": round(span, 2),
            "wall_s": round(wall, 2),
            "trials_per_min": round(len(counted) / span * 60, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def storage_writes(zoo: Path, storage: str, trials: int) -> dict[str, Any]:
    """SQL statements one search (one driver, in this process) sends to its storage, by kind,
    per trial, counted at the SQLAlchemy engine; and the bytes the database wrote: the
    process tree's for a SQLite file, the server's write-ahead log for PostgreSQL."""
    from recycler.commands.search import run_search
    from recycler.search.storage import rdb_storage

    work = Path(tempfile.mkdtemp(prefix="bench-writes-"))
    kind = storage.split(":", 1)[0]
    if kind == "sqlite":
        storage = f"sqlite:///{work / 'study.db'}"
    statements: Counter[str] = Counter()

    def count(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
    ) -> None:
        statements[statement.lstrip().split(None, 1)[0].upper()] += (
            len(params) if executemany else 1
        )

    try:
        study = write_study(
            zoo, work, f"bench-writes-{os.getpid()}-{time.time_ns()}", storage, trials, 1
        )
        engine = rdb_storage(storage).engine
        event.listen(engine, "before_cursor_execute", count)
        wal_before = _wal_lsn(storage)
        with TreeWrites() as writes:
            run_search(study, trials)
        event.remove(engine, "before_cursor_execute", count)
        written = writes.written if kind == "sqlite" else _wal_lsn(storage) - wal_before
        return {
            "storage": kind,
            "trials": trials,
            "writes_per_trial": round(
                sum(statements[k] for k in ("INSERT", "UPDATE", "DELETE")) / trials, 1
            ),
            "reads_per_trial": round(statements["SELECT"] / trials, 1),
            "bytes_per_trial": round(written / trials),
            "bytes_measured": "process tree write_bytes" if kind == "sqlite" else "server WAL",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wal_lsn(storage: str) -> int:
    """The PostgreSQL server's write-ahead log position in bytes (0 for SQLite)."""
    if not storage.startswith("postgresql"):
        return 0
    from recycler.search.storage import rdb_storage

    with rdb_storage(storage).engine.connect() as conn:
        return int(
            conn.execute(text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")).scalar_one()
        )


def many_drivers(zoo: Path, trials: int) -> dict[str, Any]:
    """One driver against two on a PostgreSQL study; storage writes on SQLite and PostgreSQL."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        return {
            "skipped": f"no PostgreSQL server ({POSTGRES_ENV} unset; `make bench` sets it where "
            "it can)"
        }
    return {
        "throughput": [drivers_throughput(zoo, url, n, trials) for n in (1, 2)],
        "writes": [storage_writes(zoo, storage, trials) for storage in ("sqlite", url)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", nargs="+", default=["micro", "small"], choices=["micro", "small"]
    )
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--drivers-pool",
        default="small",
        choices=["micro", "small"],
        help="the pool of the one-vs-two-drivers and storage-writes figures",
    )
    parser.add_argument("--drivers-trials", type=int, default=16)
    parser.add_argument(
        "--only-drivers", action="store_true", help="measure only the many-driver figures"
    )
    args = parser.parse_args()

    from recycler.cluster.connect import start_ray
    from recycler.zoo.build import build_zoo

    torch.set_num_threads(1)
    start_ray(None)
    rows: list[dict[str, Any]] = []
    for size in [] if args.only_drivers else args.sizes:
        zoo = build_zoo(POOLS / f"zoo-{size}-seed0", size=size, seed=0, quiet=True)
        dtype = load_study_spec(zoo / "study.yaml").merge.dtype
        row: dict[str, Any] = {"size": size, "dtype": dtype}
        row["merge_one_process_s"] = round(merge_in_one_process(zoo, dtype, args.repeats), 4)
        for shards in (1, 2):
            row[f"merge_ray_{shards}_shards_s"] = round(
                merge_on_ray(zoo, dtype, shards, args.repeats), 4
            )
        row["searches"] = [search(zoo, workers, args.trials) for workers in (1, 2)]
        if RAM_DISK.is_dir():
            row["searches"].append(search(zoo, 1, args.trials, storage_dir=RAM_DISK))
        rows.append(row)
        print(json.dumps(row))
    zoo = build_zoo(
        POOLS / f"zoo-{args.drivers_pool}-seed0", size=args.drivers_pool, seed=0, quiet=True
    )
    drivers = {"pool": args.drivers_pool, **many_drivers(zoo, args.drivers_trials)}
    print(json.dumps(drivers))
    if not args.only_drivers:
        write(rows, args)
    write_drivers(drivers)
    return 0


def header(title: str, detail: str) -> list[str]:
    """A results page's title and the line saying when, on what machine, under what load."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"# {title}",
        "",
        f"Written by `experiments/bench_ray.py` on {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, load at the "
        f"end {load}; {detail}",
        "",
    ]


def write_drivers(drivers: dict[str, Any]) -> None:
    """experiments/results/bench_drivers.md and .json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_drivers.json").write_text(json.dumps(drivers, indent=2) + "\n")
    lines = header(
        "Many drivers, one study: throughput and storage writes",
        f"the {drivers['pool']} demo pool.",
    )
    if "skipped" in drivers:
        lines.append(f"Not measured: {drivers['skipped']}.")
    else:
        lines += [
            "## `recycler search` processes on one PostgreSQL study (one evaluation worker each)",
            "",
            "| drivers | trials counted | trials stored | first trial start → last end s | "
            "wall s (with start-up) | trials / min |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {t['drivers']} | {t['trials_counted']} | {t['trials_stored']} | {t['span_s']} | "
            f"{t['wall_s']} | {t['trials_per_min']} |"
            for t in drivers["throughput"]
        ]
        lines += [
            "",
            "## The storage's writes per trial (one driver, the whole search divided by its "
            "trials)",
            "",
            "| storage | trials | INSERT/UPDATE/DELETE statements / trial | SELECT statements / "
            "trial | bytes written / trial | bytes measured |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {w['storage']} | {w['trials']} | {w['writes_per_trial']} | "
            f"{w['reads_per_trial']} | {w['bytes_per_trial']:,} | {w['bytes_measured']} |"
            for w in drivers["writes"]
        ]
        lines += [
            "",
            "Statements are counted at the SQLAlchemy engine of the driver; they include the",
            "study's creation, the baseline and the test-split re-scoring of the front. Each",
            "driver starts its own local Ray cluster; on a 2-core machine two drivers share the",
            "same two cores.",
        ]
    (RESULTS / "bench_drivers.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'bench_drivers.md'}")


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_ray.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        *header(
            "Ray: merge placement and search cost on the demo pools",
            f"a real local Ray cluster; medians of {args.repeats} merges after one warm-up.",
        ),
        "## Recipe → merged weights inside the evaluation model",
        "",
        "| pool | dtype | one process s | Ray, 1 shard worker s | Ray, 2 shard workers s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['merge_one_process_s']:.4f} | "
            f"{r['merge_ray_1_shards_s']:.4f} | {r['merge_ray_2_shards_s']:.4f} |"
        )
    lines += [
        "",
        "## A search: throughput and bytes written to disk",
        "",
        "| pool | evaluation workers | study storage | trials | wall s | trials / min | bytes "
        "written by the process tree | study SQLite file bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for s in r["searches"]:
            lines.append(
                f"| {r['size']} | {s['eval_workers']} | "
                f"{'RAM disk' if s['storage_in_ram'] else 'disk'} | {s['trials']} | "
                f"{s['wall_s']} | {s['trials_per_min']} | {s['bytes_written_tree']:,} | "
                f"{s['storage_bytes']:,} |"
            )
    lines += [
        "",
        "Bytes written: the sum over the driver, Ray's own processes and the workers of",
        "/proc/PID/io `write_bytes` during the search; no merged model is written. With the",
        "study's SQLite file on a RAM disk the tree writes only Ray's logs: the rest, with the",
        "file on disk, is SQLite's (every Optuna storage call is a transaction that rewrites",
        "its pages and its rollback journal, so the bytes written exceed the file's size).",
        "The one-process figure merges from memory-mapped files; the Ray figures",
        "include the shard merges, the transfer through the object store and the copy into",
        "the resident model. On a 2-core machine more workers share the same two cores.",
    ]
    (RESULTS / "bench_ray.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'bench_ray.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
