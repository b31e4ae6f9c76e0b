"""The local model registry: projects, model versions, packaging jobs, client tokens, components.

Metadata lives in SQLite (``$EDGE_AGENT_HOME/registry.db``, WAL mode), model files under
``$EDGE_AGENT_HOME/projects/<project>/models/<version>/`` as model packages. Every write is one
``BEGIN IMMEDIATE`` transaction, so several processes (CLI calls, job workers) can share a home:
SQLite serialises the writers, which is what makes "same ClientToken → one job" hold under
concurrent starts.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.package import ModelPackage, build_package, load_package
from agent.errors import PackageError
from agent.packaging.errors import (
    AccessDeniedException,
    ConflictException,
    InternalServerException,
    ResourceNotFoundException,
    ThrottlingException,
    ValidationException,
)
from agent.runtime.onnx import OnnxProbe

# Version 0: the tables as the first release created them (without a user_version). Kept verbatim:
# a fresh database is made by the same steps an old one is migrated by, so the two cannot differ.
BASELINE = (
    """CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY, arn TEXT NOT NULL, created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS models (
    project TEXT NOT NULL, version INTEGER NOT NULL, arn TEXT NOT NULL, status TEXT NOT NULL,
    status_message TEXT NOT NULL, description TEXT NOT NULL, kind TEXT NOT NULL, source TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (project, version))""",
    """CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL, name TEXT NOT NULL, model_version TEXT NOT NULL,
    configuration TEXT NOT NULL, description TEXT, status TEXT NOT NULL, status_message TEXT NOT NULL,
    component_name TEXT NOT NULL, component_version TEXT NOT NULL, component_arn TEXT,
    settings TEXT NOT NULL, owner TEXT, heartbeat REAL, created REAL NOT NULL, updated REAL NOT NULL,
    UNIQUE (project, name))""",
    """CREATE TABLE IF NOT EXISTS tokens (
    operation TEXT NOT NULL, token TEXT NOT NULL, request_hash TEXT NOT NULL, result TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (operation, token))""",
    """CREATE TABLE IF NOT EXISTS components (
    name TEXT NOT NULL, version TEXT NOT NULL, arn TEXT NOT NULL, project TEXT NOT NULL, job TEXT NOT NULL,
    tags TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (name, version))""",
)

# MIGRATIONS[n] takes a version-n database to version n+1 (PRAGMA user_version). Append only: a
# released step never changes, and each runs in the same transaction as the version bump.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: indexes for the queries every call makes (liveness checks, component conflicts).
    ("CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status)",
     "CREATE INDEX IF NOT EXISTS jobs_by_component ON jobs (component_name, component_version)"),
)
SCHEMA_VERSION = len(MIGRATIONS)

ACTIVE = ("CREATED", "RUNNING")


def default_home(env: dict[str, str] | os._Environ[str]) -> Path:
    """EDGE_AGENT_HOME, else $XDG_DATA_HOME/edge-agent, else ~/.local/share/edge-agent."""
    if env.get("EDGE_AGENT_HOME"):
        return Path(env["EDGE_AGENT_HOME"])
    data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "edge-agent"


@dataclass(frozen=True)
class ModelRecord:
    project: str
    version: int
    arn: str
    status: str
    status_message: str
    description: str
    kind: str
    created: float
    path: Path


@dataclass(frozen=True)
class JobRecord:
    project: str
    name: str
    model_version: str
    configuration: dict[str, Any]
    description: str | None
    status: str
    status_message: str
    component_name: str
    component_version: str
    component_arn: str | None
    settings: dict[str, Any]
    owner: str | None
    heartbeat: float | None
    created: float
    updated: float


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        project=row["project"], name=row["name"], model_version=row["model_version"],
        configuration=json.loads(row["configuration"]), description=row["description"], status=row["status"],
        status_message=row["status_message"], component_name=row["component_name"],
        component_version=row["component_version"], component_arn=row["component_arn"],
        settings=json.loads(row["settings"]), owner=row["owner"], heartbeat=row["heartbeat"],
        created=row["created"], updated=row["updated"])


class Registry:
    """SQLite-backed registry under one home directory. Holds no connection between calls."""

    def __init__(self, home: Path, *, clock: Callable[[], float], region: str, account: str,
                 busy_timeout_s: float = 10.0) -> None:
        self.home = Path(home)
        self.clock = clock
        self.region = region
        self.account = account
        self.busy_timeout_s = busy_timeout_s
        try:
            if self.home.exists() and not self.home.is_dir():
                raise NotADirectoryError(20, "it is not a directory")
            self.home.mkdir(parents=True, exist_ok=True)
            os.listdir(self.home)  # an unreadable home fails here, with its real reason
        except OSError as exc:
            raise AccessDeniedException(f"the registry directory {self.home} can't be used: "
                                        f"{exc.strerror or exc}") from None
        try:
            db = self._connect()
            try:
                db.execute("PRAGMA journal_mode=WAL")
                self._migrate(db)
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise self._translate(exc) from None

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the database to SCHEMA_VERSION in place; refuse one written by a newer edge-agent.

        BEGIN IMMEDIATE and a re-read of user_version inside it: two processes opening an old
        database at once migrate it once.
        """
        if self._schema_version(db) == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            version = self._schema_version(db)
            if version == 0:
                for statement in BASELINE:  # today's tables, if this is a new database
                    db.execute(statement)
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _schema_version(self, db: sqlite3.Connection) -> int:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            from agent import __version__

            raise InternalServerException(
                f"the registry {self.db_path} has schema version {version}, written by a newer edge-agent; this "
                f"edge-agent ({__version__}) knows versions up to {SCHEMA_VERSION}: use the newer edge-agent, or "
                "another EDGE_AGENT_HOME")
        return version

    @property
    def db_path(self) -> Path:
        return self.home / "registry.db"

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def _translate(self, exc: sqlite3.Error) -> Exception:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return ThrottlingException(f"the registry {self.db_path} is busy (locked by other writers for more "
                                       f"than {self.busy_timeout_s:g} s); retry")
        if "readonly" in text or "unable to open" in text:
            return AccessDeniedException(f"the registry {self.db_path} cannot be written: {text}")
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return InternalServerException(
                f"the registry {self.db_path} is damaged ({text}); restore it from a backup, or move it away "
                "to start an empty registry")
        return InternalServerException(f"registry error: {text}")

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; BEGIN IMMEDIATE takes the write lock up front so check-then-insert is atomic."""
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            raise self._translate(exc) from None
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db)
            raise self._translate(exc) from None
        except BaseException:
            _rollback(db)
            raise
        finally:
            db.close()

    # -- ARNs ----------------------------------------------------------------------------------

    def project_arn(self, project: str) -> str:
        return f"arn:aws:lookoutvision:{self.region}:{self.account}:project/{project}"

    def model_arn(self, project: str, version: int | str) -> str:
        return f"arn:aws:lookoutvision:{self.region}:{self.account}:model/{project}/{version}"

    def component_arn(self, name: str, version: str) -> str:
        return f"arn:aws:greengrass:{self.region}:{self.account}:components:{name}:versions:{version}"

    # -- projects ------------------------------------------------------------------------------

    def create_project(self, name: str) -> dict[str, Any]:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM projects WHERE name=?", (name,)).fetchone():
                raise ConflictException(f"project {name!r} already exists")
            row = {"name": name, "arn": self.project_arn(name), "created": self.clock()}
            db.execute("INSERT INTO projects (name, arn, created) VALUES (:name, :arn, :created)", row)
        return row

    def get_project(self, name: str, db: sqlite3.Connection | None = None) -> dict[str, Any]:
        if db is None:
            with self.transaction(write=False) as conn:
                return self.get_project(name, conn)
        row = db.execute("SELECT * FROM projects WHERE name=?", (name,)).fetchone()
        if row is None:
            raise ResourceNotFoundException(f"project {name!r} does not exist")
        return dict(row)

    def list_projects(self) -> list[dict[str, Any]]:
        with self.transaction(write=False) as db:
            return [dict(r) for r in db.execute("SELECT * FROM projects ORDER BY created, name")]

    # -- models --------------------------------------------------------------------------------

    def model_dir(self, project: str, version: int) -> Path:
        return self.home / "projects" / project / "models" / str(version)

    def import_model(self, project: str, onnx_path: Path, *, kind: str, description: str,
                     build_options: dict[str, Any], validate: Callable[[ModelPackage], None]) -> ModelRecord:
        """Validate onnx_path as a model package and register it as the project's next version.

        The package is built and checked in a temporary directory first; only then is a version
        number taken and the directory renamed into place, in the same transaction, so a bad file
        or a crash leaves neither a row nor files behind.
        """
        self.get_project(project)
        staging_root = self.home / "projects" / project / "models"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=staging_root))
        try:
            try:
                package = build_package(onnx_path, staging / "package", name="model", kind=kind,
                                        description=description, probe=OnnxProbe(), **build_options)
                validate(package)
            except PackageError as exc:
                raise ValidationException(f"the model can't be imported: {exc.message}") from None
            with self.transaction() as db:
                self.get_project(project, db)
                row = db.execute("SELECT MAX(version) AS v FROM models WHERE project=?", (project,)).fetchone()
                version = int(row["v"] or 0) + 1
                final = self.model_dir(project, version)
                if final.exists():  # left by a crash between rename and commit: the row is the truth
                    shutil.rmtree(final)
                os.replace(staging / "package", final)
                try:
                    record = ModelRecord(project, version, self.model_arn(project, version), "TRAINED",
                                         f"imported from {Path(onnx_path).name}", description, package.kind,
                                         self.clock(), final)
                    db.execute(
                        "INSERT INTO models (project, version, arn, status, status_message, description, kind, "
                        "source, created) VALUES (?,?,?,?,?,?,?,?,?)",
                        (project, version, record.arn, record.status, record.status_message, description,
                         record.kind, str(onnx_path), record.created))
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
            return record
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _model(self, row: sqlite3.Row) -> ModelRecord:
        return ModelRecord(row["project"], row["version"], row["arn"], row["status"], row["status_message"],
                           row["description"], row["kind"], row["created"],
                           self.model_dir(row["project"], row["version"]))

    def get_model(self, project: str, version: str, db: sqlite3.Connection | None = None) -> ModelRecord:
        """version is "1", "2", ... or "latest"."""
        if db is None:
            with self.transaction(write=False) as conn:
                return self.get_model(project, version, conn)
        self.get_project(project, db)
        if version == "latest":
            row = db.execute("SELECT * FROM models WHERE project=? ORDER BY version DESC LIMIT 1",
                             (project,)).fetchone()
        else:
            row = db.execute("SELECT * FROM models WHERE project=? AND version=?", (project, int(version))).fetchone()
        if row is None:
            raise ResourceNotFoundException(f"model version {version!r} does not exist in project {project!r}")
        return self._model(row)

    def list_models(self, project: str) -> list[ModelRecord]:
        with self.transaction(write=False) as db:
            self.get_project(project, db)
            return [self._model(r) for r in db.execute("SELECT * FROM models WHERE project=? ORDER BY version",
                                                       (project,))]

    def load_model_package(self, record: ModelRecord) -> ModelPackage:
        try:
            return load_package(record.path)
        except PackageError as exc:
            raise InternalServerException(f"model {record.project}/{record.version} is damaged in the registry: "
                                          f"{exc.message}") from None

    # -- jobs ----------------------------------------------------------------------------------

    def get_job(self, project: str, name: str, db: sqlite3.Connection | None = None) -> JobRecord:
        if db is None:
            with self.transaction(write=False) as conn:
                return self.get_job(project, name, conn)
        self.get_project(project, db)
        row = db.execute("SELECT * FROM jobs WHERE project=? AND name=?", (project, name)).fetchone()
        if row is None:
            raise ResourceNotFoundException(f"model packaging job {name!r} does not exist in project {project!r}")
        return _job(row)

    def list_jobs(self, project: str, after_seq: int, limit: int) -> tuple[list[JobRecord], int | None]:
        """Jobs in creation order after seq after_seq; returns them and the seq to continue from."""
        with self.transaction(write=False) as db:
            self.get_project(project, db)
            rows = db.execute("SELECT * FROM jobs WHERE project=? AND seq>? ORDER BY seq LIMIT ?",
                              (project, after_seq, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_job(r) for r in rows], (rows[-1]["seq"] if more else None)

    def active_jobs(self) -> list[JobRecord]:
        with self.transaction(write=False) as db:
            return [_job(r) for r in db.execute("SELECT * FROM jobs WHERE status IN ('CREATED','RUNNING')")]

    def insert_job(self, db: sqlite3.Connection, job: JobRecord) -> None:
        db.execute(
            "INSERT INTO jobs (project, name, model_version, configuration, description, status, status_message, "
            "component_name, component_version, component_arn, settings, owner, heartbeat, created, updated) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (job.project, job.name, job.model_version, json.dumps(job.configuration), job.description, job.status,
             job.status_message, job.component_name, job.component_version, job.component_arn,
             json.dumps(job.settings), job.owner, job.heartbeat, job.created, job.updated))

    def claim_job(self, project: str, name: str, owner: str, from_status: tuple[str, ...] = ("CREATED",),
                  expected_owner: str | None = None) -> bool:
        """CREATED → RUNNING for owner, only if nobody else did it first."""
        now = self.clock()
        with self.transaction() as db:
            row = db.execute("SELECT status, owner FROM jobs WHERE project=? AND name=?", (project, name)).fetchone()
            if row is None or row["status"] not in from_status:
                return False
            if expected_owner is not None and row["owner"] != expected_owner:
                return False
            db.execute("UPDATE jobs SET status='RUNNING', status_message=?, owner=?, heartbeat=?, updated=? "
                       "WHERE project=? AND name=?",
                       ("packaging the model", owner, now, now, project, name))
        return True

    def update_job(self, project: str, name: str, owner: str, *, status: str | None = None,
                   message: str | None = None, component_arn: str | None = None, heartbeat_only: bool = False) -> bool:
        """Change a RUNNING job owned by owner; False if it is no longer ours (e.g. declared crashed)."""
        now = self.clock()
        with self.transaction() as db:
            row = db.execute("SELECT status, owner FROM jobs WHERE project=? AND name=?", (project, name)).fetchone()
            if row is None or row["status"] != "RUNNING" or row["owner"] != owner:
                return False
            if heartbeat_only:
                db.execute("UPDATE jobs SET heartbeat=? WHERE project=? AND name=?", (now, project, name))
                return True
            db.execute(
                "UPDATE jobs SET status=COALESCE(?, status), status_message=COALESCE(?, status_message), "
                "component_arn=COALESCE(?, component_arn), heartbeat=?, updated=? WHERE project=? AND name=?",
                (status, message, component_arn, now, now, project, name))
            if status == "SUCCEEDED":
                job = _job(db.execute("SELECT * FROM jobs WHERE project=? AND name=?", (project, name)).fetchone())
                tags = job.configuration.get("Greengrass", {}).get("Tags", [])
                db.execute("INSERT OR REPLACE INTO components (name, version, arn, project, job, tags, created) "
                           "VALUES (?,?,?,?,?,?,?)", (job.component_name, job.component_version, component_arn or "",
                                                      project, name, json.dumps(tags), now))
        return True

    def fail_job(self, project: str, name: str, message: str, *, only_owner: str | None = None) -> bool:
        """Any non-terminal job → FAILED (crash recovery); with only_owner, only if still that owner's."""
        now = self.clock()
        with self.transaction() as db:
            row = db.execute("SELECT status, owner FROM jobs WHERE project=? AND name=?", (project, name)).fetchone()
            if row is None or row["status"] not in ACTIVE:
                return False
            if only_owner is not None and row["owner"] != only_owner:
                return False
            db.execute("UPDATE jobs SET status='FAILED', status_message=?, updated=? WHERE project=? AND name=?",
                       (message, now, project, name))
        return True

    def component_taken(self, db: sqlite3.Connection, name: str, version: str) -> str | None:
        """Why name+version can't be created again (an existing component or a job making it), else None."""
        if db.execute("SELECT 1 FROM components WHERE name=? AND version=?", (name, version)).fetchone():
            return f"component {name} version {version} already exists"
        row = db.execute("SELECT project, name FROM jobs WHERE component_name=? AND component_version=? AND "
                         "status IN ('CREATED','RUNNING','SUCCEEDED')", (name, version)).fetchone()
        if row:
            return (f"component {name} version {version} is already produced by model packaging job "
                    f"{row['name']!r} of project {row['project']!r}")
        return None

    def count_active(self, db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COUNT(*) AS n FROM jobs WHERE status IN ('CREATED','RUNNING')").fetchone()["n"])

    # -- client tokens -------------------------------------------------------------------------

    def find_token(self, db: sqlite3.Connection, operation: str, token: str, ttl_s: float) -> sqlite3.Row | None:
        """The live record of token (younger than ttl_s); expired records are dropped."""
        db.execute("DELETE FROM tokens WHERE created < ?", (self.clock() - ttl_s,))
        return db.execute("SELECT * FROM tokens WHERE operation=? AND token=?", (operation, token)).fetchone()

    def save_token(self, db: sqlite3.Connection, operation: str, token: str, request_hash: str,
                   result: dict[str, Any]) -> None:
        db.execute("INSERT OR REPLACE INTO tokens (operation, token, request_hash, result, created) VALUES "
                   "(?,?,?,?,?)", (operation, token, request_hash, json.dumps(result), self.clock()))


def _rollback(db: sqlite3.Connection) -> None:
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass
