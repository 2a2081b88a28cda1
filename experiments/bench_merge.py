"""Speed of `recycler merge` against `mergekit-yaml` on the same recipes.

    python experiments/bench_merge.py [--sizes 60M,440M] [--runs 3] [--methods M1,M2]

For each size, a pool of 4 bf16 Llama-style checkpoints and a base with random
weights is built once (experiments/make_pool.py, cached under experiments/_pools/).
For each method (by default linear: the C kernel file to file; ties: a sparsifying
merge in memory; model_stock: a non-linear, geometric one; gradient_slerp and
frankenmerge: mergekit's `slices:` examples on the first two checkpoints) both tools merge the same
recipe as subprocesses, alternately (the order swaps every round), `--runs` times
each. Per run: wall time, peak RSS of the process tree (polled, plus the kernel's
ru_maxrss), peak anonymous RSS (RSS less file pages, i.e. less memory-mapped
inputs), bytes read (the inputs' safetensors files) and written (the output's), and,
for recycler, its own in-process merge time from RECYCLER_TIMINGS_JSON. The machine's
streaming memory bandwidth is measured in the same run (copy and triad, read + write
bytes counted) and the merge's GB/s is reported as a fraction of it.

Page cache: the inputs are read once before timing so both tools start warm; the
cache is never dropped (the machine is shared). Outputs are deleted and `sync`ed
between runs, outside the timed region.

Results: experiments/results/bench_merge.{md,json,csv} (`--out` elsewhere; `make bench`
writes the recipe styles, gradient_slerp and frankenmerge, to bench_recipes.*, so the
two runs keep each other's rows). Without ./.venv-mergekit
(experiments/mergekit_env.sh makes it) only recycler is measured, and the report
says so.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import make_pool  # noqa: E402

MERGEKIT_VENV = Path(os.environ.get("RECYCLER_MERGEKIT_VENV", ROOT / ".venv-mergekit"))
MERGEKIT_YAML = MERGEKIT_VENV / "bin" / "mergekit-yaml"
WEIGHTS = (0.4, 0.3, 0.2, 0.1)
METHODS = ("linear", "ties", "model_stock", "gradient_slerp", "frankenmerge")
POLL_S = 0.02


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    vm = psutil.virtual_memory()
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(vm.total / 1e9, 1),
        "available_ram_gb": round(vm.available / 1e9, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
    }
    import torch

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    try:
        import importlib.metadata as md

        info["recycler"] = md.version("recycler")
    except Exception:
        info["recycler"] = "unknown"
    stamp = MERGEKIT_VENV / ".mergekit-installed"
    info["mergekit"] = stamp.read_text().strip() if stamp.is_file() else None
    return info


def measure_bandwidth(size_mb: int = 512, reps: int = 5) -> dict[str, float]:
    """Streaming memory bandwidth in GB/s (read + write bytes counted; best of `reps`).

    copy: dst = src (2 x size moved); triad: a = b + s * c (3 x size moved), both
    with torch's default thread count; numpy_copy: one thread.
    """
    import numpy as np
    import torch

    n = size_mb * 2**20 // 4
    b = torch.rand(n)
    c = torch.rand(n)
    a = torch.empty(n)
    a.copy_(b)  # touch every page first

    def best(fn: Any, moved: int) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return moved / min(times) / 1e9

    out = {
        "copy_gbs": best(lambda: a.copy_(b), 2 * 4 * n),
        "triad_gbs": best(lambda: torch.add(b, c, alpha=1.5, out=a), 3 * 4 * n),
    }
    na, nb = a.numpy(), b.numpy()
    out["numpy_copy_1thread_gbs"] = best(lambda: np.copyto(na, nb), 2 * 4 * n)
    return {k: round(v, 2) for k, v in out.items()}


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    tool: str
    size: str
    method: str
    index: int
    ok: bool
    wall_s: float
    peak_rss_mb: float  # max over polls of the process tree's summed RSS, or ru_maxrss if larger
    peak_anon_mb: float  # the same for RssAnon (not file-backed / memory-mapped pages)
    ru_maxrss_mb: float  # the kernel's peak RSS of the largest single process
    cpu_s: float  # user + system CPU seconds of the tool (GNU time); robust to other load
    major_faults: int  # page faults that went to disk (0: the inputs came from the page cache)
    bytes_read: int
    bytes_written: int
    merge_s: float | None = None  # the tool's own in-process merge time, where it reports one
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


TIME = shutil.which("time", path="/usr/bin:/bin")


@dataclass
class Measured:
    rc: int
    wall_s: float
    peak_rss_mb: float
    peak_anon_mb: float
    ru_maxrss_mb: float
    cpu_s: float
    major_faults: int
    stderr_tail: str


def run_measured(cmd: Sequence[str], env: dict[str, str]) -> Measured:
    """Run `cmd`, polling the RSS of its process tree.

    ru_maxrss, CPU time and major faults come from GNU time wrapped around the
    command: a child started directly from this (large) process would inherit this
    process's RSS high-water mark at exec. Without /usr/bin/time they are 0 / -1
    and only the polled figures count.
    """
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    err_path = tmp / f"bench_merge_{os.getpid()}.err"
    rss_path = tmp / f"bench_merge_{os.getpid()}.maxrss"
    rss_path.unlink(missing_ok=True)
    full = [TIME, "-f", "%M %U %S %F", "-o", str(rss_path), *cmd] if TIME else list(cmd)
    with open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak_rss = peak_anon = 0
        done = threading.Event()

        def poll() -> None:
            nonlocal peak_rss, peak_anon
            try:
                launcher = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not done.is_set():
                try:
                    procs = (
                        launcher.children(recursive=True)
                        if TIME
                        else [launcher, *launcher.children(recursive=True)]
                    )
                    rss = anon = 0
                    for p in procs:
                        try:
                            rss += p.memory_info().rss
                            anon += _anon_kb(p.pid) * 1024
                        except psutil.Error:
                            pass
                    peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
                except psutil.Error:
                    pass
                done.wait(POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        poller.join()
    tail = err_path.read_text(errors="replace")[-3000:]
    err_path.unlink(missing_ok=True)
    ru_mb, cpu, faults = 0.0, -1.0, -1
    if rss_path.is_file():
        # the last line is ours ("Command exited with non-zero status" may precede it)
        fields = rss_path.read_text().strip().splitlines()[-1].split()
        rss_path.unlink()
        with contextlib.suppress(IndexError, ValueError):
            ru_mb, cpu, faults = (
                int(fields[0]) / 1024,
                float(fields[1]) + float(fields[2]),
                int(fields[3]),
            )
    return Measured(
        rc, wall, max(peak_rss / 2**20, ru_mb), peak_anon / 2**20, ru_mb, cpu, faults, tail
    )


def out_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.rglob("*.safetensors")) if out.exists() else 0


def warm(files: Sequence[Path]) -> None:
    """Read every input once so that both tools start with them in the page cache."""
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def tool_command(tool: str, recipe: Path, out: Path) -> list[str]:
    if tool == "recycler":
        return [sys.executable, "-m", "recycler.cli", "merge", str(recipe), str(out)]
    # mergekit's defaults, but no tokenizer copy: the pool has no tokenizer (with one
    # missing, mergekit logs a traceback from AutoTokenizer and goes on).
    return [str(MERGEKIT_YAML), str(recipe), str(out), "--no-copy-tokenizer", "--quiet"]


def read_pass_seconds(checkpoints: Sequence[Path], reps: int = 3) -> float:
    """Best seconds for one read-only pass over every input tensor, read the way recycler's
    merge reads them: pread(2) from the page cache into a small buffer per thread (256 KB,
    cache-resident), on as many threads as the merge's kernel uses. The least time a
    merge that reads its inputs once can take here."""
    from concurrent.futures import ThreadPoolExecutor

    from recycler.merge.kernel import TASK, _workers
    from recycler.pool import Pool

    pool = Pool.from_paths(list(checkpoints), base=None)
    chunk = 1 << 18
    ranges = []  # (path, start, end) in TASK-sized pieces, as the merge hands them out
    for name in pool.tensor_names:
        for ckpt in pool.checkpoints:
            stored = ckpt.locate(name)
            assert stored is not None
            step = TASK * stored.info.dtype.itemsize
            end = stored.offset + stored.info.nbytes
            ranges += [
                (stored.path, lo, min(end, lo + step)) for lo in range(stored.offset, end, step)
            ]
    fds = {path: os.open(path, os.O_RDONLY) for path in {r[0] for r in ranges}}
    local = threading.local()

    def read(piece: tuple[Path, int, int]) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(chunk)
        view = memoryview(buf)
        path, lo, end = piece
        for at in range(lo, end, chunk):
            os.preadv(fds[path], [view[: min(chunk, end - at)]], at)

    best = float("inf")
    try:
        with ThreadPoolExecutor(_workers()) as pool_threads:
            for _ in range(reps):
                t0 = time.perf_counter()
                list(pool_threads.map(read, ranges))
                best = min(best, time.perf_counter() - t0)
    finally:
        for fd in fds.values():
            os.close(fd)
    return best


def write_recipe(method: str, pool: Any, path: Path) -> list[Path]:
    """The benchmark's recipe for `method` on `pool`; the input files it reads."""
    if method == "linear":
        models = "\n".join(
            f"  - model: {c}\n    parameters: {{weight: {w}}}"
            for c, w in zip(pool.checkpoints, WEIGHTS)
        )
        path.write_text(
            f"merge_method: linear\nmodels:\n{models}\nparameters:\n  normalize: true\ndtype: "
            "bfloat16\n"
        )
        return list(pool.files())
    if method in ("gradient_slerp", "frankenmerge"):
        return _slices_recipe(method, pool, path)
    if method == "ties":
        models = "\n".join(
            f"  - model: {c}\n    parameters: {{weight: {w}, density: 0.5}}"
            for c, w in zip(pool.checkpoints, WEIGHTS)
        )
    else:
        models = "\n".join(f"  - model: {c}" for c in pool.checkpoints)
    path.write_text(
        f"merge_method: {method}\nbase_model: {pool.base}\nmodels:\n{models}\ndtype: bfloat16\n"
    )
    return list(pool.files(include_base=True))


def _slices_recipe(method: str, pool: Any, path: Path) -> list[Path]:
    """mergekit's examples on the pool's first two checkpoints: gradient-slerp.yml (every
    layer, t gradients under filters) and a passthrough frankenmerge of the first 3/4 of
    one and the last 3/4 of the other (orcamini-platy-44layer.yml's shape)."""
    a, b = pool.checkpoints[:2]
    n = int(json.loads((a / "config.json").read_text())["num_hidden_layers"])
    if method == "gradient_slerp":
        recipe: dict[str, Any] = {
            "slices": [
                {
                    "sources": [
                        {"model": str(a), "layer_range": [0, n]},
                        {"model": str(b), "layer_range": [0, n]},
                    ]
                }
            ],
            "merge_method": "slerp",
            "base_model": str(a),
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        }
    else:
        cut = (3 * n) // 4
        recipe = {
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [0, cut]}]},
                {"sources": [{"model": str(b), "layer_range": [n - cut, n]}]},
            ],
            "merge_method": "passthrough",
        }
    path.write_text(yaml.safe_dump({**recipe, "dtype": "bfloat16"}, sort_keys=False))
    return [f for d in (a, b) for f in sorted(d.glob("*.safetensors"))]


def bench_size(
    size: str, runs: int, pools_dir: Path, tools: list[str], methods: Sequence[str], log: Any
) -> list[Run]:
    shape = make_pool.SHAPES[size]
    spec = make_pool.PoolSpec(
        shape=shape, n_checkpoints=4, with_base=True, base_dtype="bfloat16", delta_scale=0.1, seed=0
    )
    t0 = time.perf_counter()
    pool = make_pool.build_pool(pools_dir / f"llama-{size}-base", spec)
    log(
        f"[{size}] pool ready in {time.perf_counter() - t0:.1f} s: {shape.n_params() / 1e6:.1f}M "
        "params x 4 bf16 + base"
    )
    results: list[Run] = []
    for method in methods:
        results += bench_method(size, method, pool, runs, pools_dir, tools, log)
    read_pass = read_pass_seconds(pool.checkpoints)
    log(f"[{size}] read-only pass over the checkpoints: {read_pass:.3f} s")
    for run in results:
        if run.method == "linear":
            run.extra["read_pass_s"] = round(read_pass, 4)
    return results


def bench_method(
    size: str, method: str, pool: Any, runs: int, pools_dir: Path, tools: list[str], log: Any
) -> list[Run]:
    recipe = pools_dir / f"llama-{size}-{method}.yaml"
    inputs = write_recipe(method, pool, recipe)
    bytes_read = sum(f.stat().st_size for f in inputs)
    warm(inputs)
    work = pools_dir / "_out"
    results: list[Run] = []
    for i in range(runs):
        order = tools if i % 2 == 0 else list(reversed(tools))
        for tool in order:
            out = work / f"{size}-{method}-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            timings = work / f"{size}-{method}-{tool}.timings.json"
            timings.unlink(missing_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "RECYCLER_TIMINGS_JSON": str(timings)}
            m = run_measured(tool_command(tool, recipe, out), env)
            run = Run(
                tool=tool,
                size=size,
                method=method,
                index=i,
                ok=m.rc == 0,
                wall_s=round(m.wall_s, 3),
                peak_rss_mb=round(m.peak_rss_mb, 1),
                peak_anon_mb=round(m.peak_anon_mb, 1),
                ru_maxrss_mb=round(m.ru_maxrss_mb, 1),
                cpu_s=round(m.cpu_s, 2),
                major_faults=m.major_faults,
                bytes_read=bytes_read,
                bytes_written=out_bytes(out),
            )
            if m.rc != 0:
                tail = m.stderr_tail.strip()
                run.error = f"exit {m.rc}: {tail.splitlines()[-1] if tail else ''}"
            if tool == "recycler" and timings.is_file():
                t = json.loads(timings.read_text())
                run.merge_s = float(t["merge_seconds"])
                run.extra = {k: t[k] for k in ("bytes_read", "bytes_written") if k in t}
            results.append(run)
            log(
                f"[{size} {method}] {tool:8s} run {i}: {m.wall_s:6.2f} s wall, {m.cpu_s:6.2f} s CPU"
                + (f", merge {run.merge_s:.2f} s" if run.merge_s is not None else "")
                + f", peak RSS {m.peak_rss_mb:5.0f} MB (anon {m.peak_anon_mb:5.0f} MB)"
                + f", {m.major_faults} major faults"
                + ("" if run.ok else f"  FAILED {run.error}")
            )
            shutil.rmtree(out, ignore_errors=True)
            timings.unlink(missing_ok=True)
            os.sync()
    return results


# --------------------------------------------------------------------------- report


def summarize(runs: list[Run], bandwidth: float) -> list[dict[str, Any]]:
    rows = []
    order = {m: i for i, m in enumerate(dict.fromkeys(r.method for r in runs))}
    keys = sorted(
        {(r.size, r.method, r.tool) for r in runs},
        key=lambda k: (make_pool.SHAPES[k[0]].n_params(), order[k[1]], k[2] != "recycler"),
    )
    for size, method, tool in keys:
        ok = [r for r in runs if (r.size, r.method, r.tool) == (size, method, tool) and r.ok]
        failed = [
            r for r in runs if (r.size, r.method, r.tool) == (size, method, tool) and not r.ok
        ]
        row: dict[str, Any] = {
            "size": size,
            "method": method,
            "tool": tool,
            "runs": len(ok),
            "failed": len(failed),
        }
        if failed:
            row["error"] = failed[0].error
        if ok:
            walls = [r.wall_s for r in ok]
            moved = ok[0].bytes_read + ok[0].bytes_written
            row.update(
                wall_median_s=round(statistics.median(walls), 2),
                wall_min_s=round(min(walls), 2),
                wall_max_s=round(max(walls), 2),
                cpu_median_s=round(statistics.median(r.cpu_s for r in ok), 2),
                major_faults_max=max(r.major_faults for r in ok),
                peak_rss_mb=round(max(r.peak_rss_mb for r in ok)),
                peak_anon_mb=round(max(r.peak_anon_mb for r in ok)),
                bytes_read=ok[0].bytes_read,
                bytes_written=ok[0].bytes_written,
                gbs_wall=round(moved / statistics.median(walls) / 1e9, 3),
                bw_fraction_wall=round(moved / statistics.median(walls) / 1e9 / bandwidth, 3),
            )
            row["gbs_wall_best"] = round(moved / min(walls) / 1e9, 3)
            merges = [r.merge_s for r in ok if r.merge_s]
            if merges:
                m = statistics.median(merges)
                row.update(
                    merge_median_s=round(m, 3),
                    merge_min_s=round(min(merges), 3),
                    gbs_merge=round(moved / m / 1e9, 3),
                    bw_fraction_merge=round(moved / m / 1e9 / bandwidth, 3),
                    gbs_merge_best=round(moved / min(merges) / 1e9, 3),
                    bw_fraction_merge_best=round(moved / min(merges) / 1e9 / bandwidth, 3),
                )
            read_pass = ok[0].extra.get("read_pass_s")
            if read_pass:
                row.update(
                    read_pass_s=read_pass,
                    read_pass_gbs=round(ok[0].bytes_read / read_pass / 1e9, 2),
                )
                if merges:
                    row["merge_over_read_pass"] = round(min(merges) / read_pass, 2)
        rows.append(row)
    for row in rows:
        other = next(
            (
                r
                for r in rows
                if (r["size"], r["method"], r["tool"]) == (row["size"], row["method"], "mergekit")
            ),
            None,
        )
        if (
            row["tool"] == "recycler"
            and other
            and "wall_median_s" in row
            and "wall_median_s" in other
        ):
            row["speedup_vs_mergekit"] = round(other["wall_median_s"] / row["wall_median_s"], 2)
            row["speedup_vs_mergekit_best"] = round(other["wall_min_s"] / row["wall_min_s"], 2)
            if row["cpu_median_s"] > 0 and other["cpu_median_s"] > 0:
                row["cpu_ratio_vs_mergekit"] = round(other["cpu_median_s"] / row["cpu_median_s"], 2)
            row["rss_vs_mergekit"] = round(row["peak_rss_mb"] / other["peak_rss_mb"], 2)
    return rows


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec) if spec else str(v)


def write_report(
    out: Path,
    info: dict[str, Any],
    bw: dict[str, Any],
    rows: list[dict[str, Any]],
    runs: list[Run],
    notes: list[str],
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "bandwidth": bw,
        "summary": rows,
        "runs": [asdict(r) for r in runs],
        "notes": notes,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        fields = [k for k in asdict(runs[0]) if k != "extra"] if runs else []
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow(asdict(r))

    lines = [
        "# `recycler merge` vs `mergekit-yaml` — merges of bf16 Llama checkpoints",
        "",
        f"Written by `experiments/bench_merge.py` on {time.strftime('%Y-%m-%d %H:%M')}."
        " Medians over the runs; tools run alternately as subprocesses.",
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']} — {info['logical_cores']} logical cores ({info['physical_cores']} "
        "physical), "
        f"{info['ram_gb']} GB RAM ({info['available_ram_gb']} GB available at start)",
        f"- load average at start {', '.join(f'{x:.2f}' for x in info['loadavg_start'])}; "
        f"at end {', '.join(f'{x:.2f}' for x in info.get('loadavg_end', []))} (the machine is "
        "shared)",
        f"- Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"recycler {info['recycler']}, mergekit: {info['mergekit'] or 'not installed'}",
        f"- streaming memory bandwidth (read + write bytes, best of 5; before / after the merges): "
        f"copy {bw['before']['copy_gbs']} / {bw['after']['copy_gbs']} GB/s, "
        f"triad {bw['before']['triad_gbs']} / {bw['after']['triad_gbs']} GB/s, "
        f"1-thread numpy copy {bw['before']['numpy_copy_1thread_gbs']} GB/s. "
        f"**Bound used: {bw['bound_gbs']} GB/s** (the highest of these).",
        "",
        "## Results",
        "",
        "| size | method | tool | runs | wall s (median, min–max) | CPU s | in-process merge s | "
        "peak RSS MB "
        "| peak anon RSS MB | GB/s (wall) | GB/s (merge) | bandwidth fraction (wall / merge) "
        "| speedup vs mergekit (wall / CPU) | RSS vs mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "wall_median_s" not in r:
            lines.append(
                f"| {r['size']} | {r['method']} | {r['tool']} | 0 ({r['failed']} failed) | "
                f"{r.get('error', '')} "
                "| | | | | | | | | |"
            )
            continue
        frac = f"{r['bw_fraction_wall']:.1%}" + (
            f" / {r['bw_fraction_merge']:.1%}" if "bw_fraction_merge" in r else ""
        )
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        speed = "–"
        if "speedup_vs_mergekit" in r:
            speed = (
                f"{r['speedup_vs_mergekit']:.2f}x / {_fmt(r.get('cpu_ratio_vs_mergekit'), '.2f')}x"
            )
        lines.append(
            f"| {r['size']} | {r['method']} | {r['tool']} | {r['runs']}{failed} "
            f"| {r['wall_median_s']:.2f} ({r['wall_min_s']:.2f}–{r['wall_max_s']:.2f}) | "
            f"{r['cpu_median_s']:.2f} "
            f"| {_fmt(r.get('merge_median_s'), '.2f')} | {r['peak_rss_mb']} | {r['peak_anon_mb']} "
            f"| {r['gbs_wall']:.2f} | {_fmt(r.get('gbs_merge'), '.2f')} | {frac} "
            f"| {speed} "
            f"| {_fmt(r.get('rss_vs_mergekit'), '.2f')} |"
        )
    lines += [
        "",
        "Best runs (min wall and min in-process merge time of each tool; the fairer view when "
        "other work "
        "shares the machine):",
        "",
        "| size | method | tool | min wall s | GB/s (min wall) | min merge s | GB/s (min merge) | "
        "bandwidth fraction "
        "(min merge) | speedup vs mergekit (min wall) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "wall_min_s" not in r:
            continue
        best_frac = f"{r['bw_fraction_merge_best']:.1%}" if "bw_fraction_merge_best" in r else "–"
        best_speed = (
            f"{r['speedup_vs_mergekit_best']:.2f}x" if "speedup_vs_mergekit_best" in r else "–"
        )
        lines.append(
            f"| {r['size']} | {r['method']} | {r['tool']} | {r['wall_min_s']:.2f} | "
            f"{r['gbs_wall_best']:.2f} "
            f"| {_fmt(r.get('merge_min_s'), '.2f')} | {_fmt(r.get('gbs_merge_best'), '.2f')} | "
            f"{best_frac} "
            f"| {best_speed} |"
        )
    floors = [r for r in rows if "merge_over_read_pass" in r]
    if floors:
        lines += [
            "",
            "Reading the inputs alone: one read-only pass over every input tensor, read as "
            "recycler's merge reads "
            "them (pread from the page cache into a cache-sized buffer per thread, on the merge's "
            "threads), best of 3, "
            "against the best in-process merge, which also computes and writes the output:",
            "",
            "| size | input bytes | read-only pass s | its GB/s | min merge s | merge / read-only "
            "pass |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['size']} | {r['bytes_read']:,} | {r['read_pass_s']:.3f} | "
            f"{r['read_pass_gbs']:.2f} "
            f"| {r['merge_min_s']:.3f} | {r['merge_over_read_pass']:.2f}x |"
            for r in floors
        ]
    cores = info["logical_cores"] or 1
    load = max([*info["loadavg_start"][:1], *info.get("loadavg_end", [])[:1]])
    if load > 0.5 * cores:
        lines += [
            "",
            f"**Note:** the 1-minute load average reached {load:.1f} on {cores} cores during this "
            "run "
            "(other work on a shared machine): wall times and bandwidth figures are disturbed; CPU "
            "seconds and the min wall times are the steadier comparison.",
        ]
    lines += ["", "## How it was measured", ""]
    lines += [f"- {n}" for n in notes]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", default="60M,440M", help=f"comma-separated, of {sorted(make_pool.SHAPES)}"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="runs of each tool per size (default 3)"
    )
    parser.add_argument("--pools-dir", type=Path, default=HERE / "_pools")
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "results" / "bench_merge",
        help="report path without suffix (.md, .json and .csv are written)",
    )
    parser.add_argument("--no-mergekit", action="store_true", help="measure recycler only")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}"
    )
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in make_pool.SHAPES]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in methods):
        parser.error(f"--methods: choose from {list(METHODS)}")
    if unknown or args.runs < 1:
        parser.error(
            f"unknown size(s) {unknown}; choose from {sorted(make_pool.SHAPES)}"
            if unknown
            else "--runs must be >= 1"
        )

    def log(msg: str) -> None:
        print(msg, flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    notes = []
    tools = ["recycler"]
    if args.no_mergekit:
        notes.append("mergekit not measured (--no-mergekit): recycler only.")
    elif MERGEKIT_YAML.is_file():
        tools.append("mergekit")
    else:
        msg = (
            f"mergekit not measured: {MERGEKIT_YAML} not found (run experiments/mergekit_env.sh); "
            "recycler only, no ratios."
        )
        notes.append(msg)
        log(msg)

    info = machine_info()
    log(
        f"machine: {info['cpu']}, {info['logical_cores']} cores, {info['ram_gb']} GB; load "
        f"{info['loadavg_start']}"
    )
    bw_before = measure_bandwidth()
    log(f"memory bandwidth: {bw_before}")
    runs: list[Run] = []
    for size in sizes:
        runs += bench_size(size, args.runs, args.pools_dir, tools, methods, log)
    bw_after = measure_bandwidth()
    log(f"memory bandwidth after: {bw_after}")
    info["loadavg_end"] = list(os.getloadavg())
    bound = max(max(bw_before.values()), max(bw_after.values()))
    bw = {"before": bw_before, "after": bw_after, "bound_gbs": bound}
    rows = summarize(runs, bound)
    notes += [
        "Pools: 4 checkpoints and a base per size, bf16, random weights (seeded), written by "
        "transformers' "
        "`save_pretrained` (experiments/make_pool.py), cached in experiments/_pools/. Recipes "
        "(dtype bfloat16): "
        f"linear, weights {list(WEIGHTS)}, normalize true (the base not read); ties, the same "
        "weights, density 0.5; "
        "model_stock over the base and the 4 checkpoints; gradient_slerp and frankenmerge, "
        "mergekit's examples/gradient-slerp.yml (slices of every layer, t gradients under the "
        "self_attn and mlp filters) and a passthrough stack of the first 3/4 of the layers of "
        "one checkpoint and the last 3/4 of another, on the first two checkpoints.",
        "Commands: `python -m recycler.cli merge RECIPE OUT` and "
        "`mergekit-yaml RECIPE OUT --no-copy-tokenizer --quiet` (mergekit 0.1.5's defaults "
        "otherwise: "
        "no --lazy-unpickle needed for safetensors, no --async-write, default threads).",
        "Page cache: inputs read once before timing, so both tools read them from memory; caches "
        "are not "
        "dropped (shared machine). Each output is deleted and `sync` is run between runs, outside "
        "the timing. "
        "Run order alternates every round.",
        "Wall time: process start to exit (interpreter start and imports included). In-process "
        "merge s: "
        "recycler's own figure (RECYCLER_TIMINGS_JSON), reading + merging + writing, process start "
        "excluded.",
        "GB/s = (bytes of input safetensors + bytes of output safetensors) / seconds. Bandwidth "
        "fraction = "
        "that / the bound above (read + write bytes, the same accounting).",
        "CPU s: user + system seconds of the tool's process (GNU time), the figure least disturbed "
        "by "
        "other work on a shared machine. Major faults: page faults served from disk (0 means the "
        "inputs "
        "were read from the page cache).",
        "Peak RSS: max of the polled (every 20 ms) RSS summed over the process tree and the "
        "kernel's "
        "ru_maxrss; RSS counts memory-mapped input pages that are resident. Peak anon RSS counts "
        "only "
        "anonymous memory (RssAnon), i.e. what the process allocated itself.",
    ]
    write_report(args.out, info, bw, rows, runs, notes)
    log(f"wrote {args.out.with_suffix('.md')} (+ .json, .csv)")
    for r in rows:
        log(json.dumps(r))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
