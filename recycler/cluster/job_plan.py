"""The plan of a Ray job that runs a study's search, computed without touching the cluster.

The job runs `python -m recycler.cli search STUDY.yaml [--n-trials N]` with the study's
folder as its `working_dir`, minus everything heavy. It carries the study file and the
small files beside it (the lm-eval task folders, local datasets, a `.rayignore`). It
never carries the pool or the study's database: those live on storage the cluster shares.
Paths the study file gives for them (`pool.checkpoints`, `pool.base`, a SQLite
`storage`), and task folders or local datasets outside the study's folder, are made
absolute in the job's copy of the study file (`StudySpec.relocated`), so a relative path
means "this folder, at the same path on the cluster": true for a local cluster and for a
study folder on a shared filesystem. For a remote cluster without one, write absolute
cluster paths (and an RDB URL or an absolute SQLite file on shared storage) in the study
file. Upload excludes, in order: Ray's defaults; weight files, databases, caches and VCS
folders; every pool path and the SQLite file inside the folder; the patterns of a
`.rayignore` (and `.gitignore`) in the folder, which Ray honours, and `excludes=` for
library callers.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recycler import __version__
from recycler.config import StudySpec, parse_study_spec
from recycler.errors import RecyclerError
from recycler.yaml_file import load_yaml

# Never uploaded with the working_dir: weights (the pool is read from shared storage),
# databases (the study's storage lives on the cluster), caches and VCS folders.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.pyc",
    ".mypy_cache/",
    ".ruff_cache/",
    ".pytest_cache/",
    ".ipynb_checkpoints/",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.onnx",
    "*.h5",
    "*.msgpack",
    "*.db",
    "*.db-journal",
    "*.db-wal",
    "*.db-shm",
    "*.sqlite",
    "*.sqlite3",
)


@dataclass
class JobPlan:
    """Everything the job submission sends, computed without touching the cluster."""

    root: Path  # the study's folder: the working_dir's source
    study_name: str  # the study file's name: the job reads it from its working_dir
    study_text: str  # the job's copy of the study file (pool/storage paths absolute)
    ignore_patterns: list[str]  # written to the working_dir's .rayignore
    entrypoint: str
    spec: StudySpec
    notes: list[str] = field(default_factory=list)


def plan_job(study_path: Path, *, n_trials: int | None, excludes: Sequence[str] = ()) -> JobPlan:
    """Validate the study file and work out the job's working_dir and entrypoint."""
    spec, notes = _validated_study(study_path)
    root = spec.root
    job = spec.relocated()
    ignore = list(DEFAULT_EXCLUDES)

    for text, moved in zip(spec.pool.checkpoints, job.pool.checkpoints):
        if moved == text:
            continue  # already absolute: the cluster's path, not necessarily this machine's
        if not _exists(moved):
            what = "matches nothing" if _is_glob(text) else "does not exist"
            raise RecyclerError(
                f"{study_path}: pool.checkpoints: {text!r} {what} under {root} "
                "(a relative pool path is read on the cluster at this same absolute path)"
            )
        rel = _relative_inside(Path(moved), root)
        if rel is not None:
            ignore.append("/" + rel)
    if spec.pool.base is not None and job.pool.base != spec.pool.base:
        assert job.pool.base is not None
        if not job.pool.base.exists():
            raise RecyclerError(f"{study_path}: pool.base: no such checkpoint: {job.pool.base}")
        rel = _relative_inside(job.pool.base, root)
        if rel is not None:
            ignore.append(_literal(rel))

    if job.storage != spec.storage:
        notes.append(
            f"storage: the job writes the study to {job.storage.removeprefix('sqlite:///')}: "
            "the cluster must see that path (a local cluster or a shared filesystem)"
        )
    db = spec.sqlite_path
    if db is not None:
        rel = _relative_inside(db, root)
        if rel is not None:
            ignore.extend(_literal(rel) + suffix for suffix in ("", "-journal", "-wal", "-shm"))
    for written, moved_dir in zip(spec.eval.task_folders, job.eval.task_folders):
        if moved_dir != written:
            notes.append(
                f"eval.tasks_dir: outside the study folder, read on the cluster at {moved_dir}"
            )
    for key, source in job.eval.datasets.items():
        if source != spec.eval.datasets[key]:
            notes.append(
                f"eval.datasets.{key}: outside the study folder, read on the cluster at the same "
                "absolute path"
            )

    ignore.extend(str(p) for p in excludes)
    header = (
        f"# The job's copy of {study_path.resolve()}, written by recycler submit {__version__}:\n"
        "# pool and storage paths are absolute, so they are read from the cluster's storage.\n"
    )
    args = ["python", "-m", "recycler.cli", "search", study_path.name]
    if n_trials is not None:
        args += ["--n-trials", str(n_trials)]
    if spec.cluster.address not in (None, "auto"):
        notes.append(
            f"cluster.address is {spec.cluster.address!r}: the job's search connects there, "
            "not to the cluster it runs on"
        )
    return JobPlan(
        root=root,
        study_name=study_path.name,
        study_text=job.to_yaml(header),
        ignore_patterns=ignore,
        entrypoint=shlex.join(args),
        spec=spec,
        notes=notes,
    )


def _validated_study(path: Path) -> tuple[StudySpec, list[str]]:
    """The study and notes; RecyclerError naming the key otherwise.

    A remote cluster may hold an absolute tasks folder or SQLite folder that this machine
    does not: that is accepted with a note. A relative one must exist here, since it is
    uploaded or read at this same path.
    """
    spec = parse_study_spec(load_yaml(path, "study"), path, check_folders=False)
    notes = []
    for key, folder in spec.missing_folders():
        given = (
            next(str(f) for f in spec.eval.task_folders if spec.resolve(f) == folder)
            if key == "eval.tasks_dir"
            else spec.storage
        )
        absolute = (
            given.startswith(("/", "~")) if key == "eval.tasks_dir" else _is_absolute_sqlite(given)
        )
        if not absolute:
            what = (
                "no such folder"
                if key == "eval.tasks_dir"
                else "no such folder for the SQLite file"
            )
            raise RecyclerError(f"{path}: {key}: {what}: {folder}")
        what = f"eval.tasks_dir {given}" if key == "eval.tasks_dir" else f"storage folder {folder}"
        notes.append(f"{what} is not on this machine: assumed to be on the cluster")
    return spec, notes


def _is_absolute_sqlite(url: str) -> bool:
    return url.startswith("sqlite:////")


def _norm(path: Path) -> Path:
    return Path(os.path.normpath(path))


def _relative_inside(path: Path, root: Path) -> str | None:
    """`path` relative to `root` (posix) if it lies inside it, else None."""
    try:
        rel = _norm(path).relative_to(_norm(root))
    except ValueError:
        return None
    return None if str(rel) == "." else rel.as_posix()


def _literal(rel: str) -> str:
    """A path as an anchored gitwildmatch pattern that matches only itself."""
    return "/" + re.sub(r"([*?\[\]\\!#])", r"\\\1", rel)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")  # as recycler.pool expands them


def _exists(pattern: str) -> bool:
    return bool(glob.glob(pattern)) if _is_glob(pattern) else Path(pattern).exists()


@contextlib.contextmanager
def staged_working_dir(plan: JobPlan) -> Iterator[Path]:
    """A temporary working_dir: the study folder's entries (symlinked), the job's study file
    and a .rayignore. Ray follows the links when it packs the folder, and prunes what the
    .rayignore (the user's patterns appended) excludes, so nothing heavy is read or sent."""
    with tempfile.TemporaryDirectory(prefix="recycler-submit-") as tmp:
        stage = Path(tmp) / "study"
        stage.mkdir()
        user_ignore = plan.root / ".rayignore"
        for entry in sorted(plan.root.iterdir()):
            if entry.name in (plan.study_name, ".rayignore"):
                continue
            (stage / entry.name).symlink_to(entry)
        (stage / plan.study_name).write_text(plan.study_text, encoding="utf-8")
        lines = ["# written by recycler submit", *plan.ignore_patterns]
        if user_ignore.is_file():
            lines += [
                "# from the study folder's .rayignore",
                *user_ignore.read_text(encoding="utf-8").splitlines(),
            ]
        (stage / ".rayignore").write_text("\n".join(lines) + "\n", encoding="utf-8")
        yield stage
