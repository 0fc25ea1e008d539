"""The shared-state database: SQLite on one host, PostgreSQL for a deployment of many.

Every piece of state Spine's workers and its CLI share — transcripts, the audit log, large tool
outputs, spans — is kept by a small store class written once against :class:`Database`, which
has two implementations:

- :class:`SQLiteDatabase`: a file in ``SPINE_STATE_DIR`` (the embedded default, one host). One
  connection per store object, kept open, used from one thread of its own, in WAL mode with fully
  synchronous commits; a transaction holds the whole file (``BEGIN IMMEDIATE``).
- :class:`PostgresDatabase`: ``SPINE_DATABASE_URL=postgresql://...`` through psycopg 3's async
  driver and its connection pool; a transaction that names a ``lock`` key first takes a
  transaction-scoped advisory lock on it, so writers of one run (or transcript) are serialised
  while different runs proceed in parallel.

Stores write SQL once, with ``?`` placeholders and the syntax both dialects share (``INSERT ...
ON CONFLICT``); the PostgreSQL side turns the placeholders into ``%s``. Each store declares its
schema as :class:`Migration` steps (one script per dialect); :meth:`Database.migrate` applies the
missing ones inside one locked transaction and records them in ``spine_schema``, so workers
starting together apply each step exactly once and a restart applies nothing.

Failures to reach or use the database raise :class:`StoreUnavailable` (a retryable
:class:`~spine.activities.errors.DependencyUnavailable`) with one line naming the database (its
password redacted); errors a store raises on purpose inside a transaction roll it back and pass
through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import sqlite3
import threading
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from spine.activities.errors import DependencyUnavailable

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

T = TypeVar("T")
Params = Sequence[object]
Dialect = Literal["sqlite", "postgresql"]
#: What a write transaction locks: one key, several (taken in sorted order) or none.
Lock = str | Sequence[str] | None

#: The SQLite file holding transcripts, large outputs and the rest (not the audit log).
DEFAULT_STATE_DB = "state.db"
#: Namespaces Spine's advisory locks (their first key) among other users of a PostgreSQL database.
PG_LOCK_CLASS = zlib.crc32(b"spine_audit") & 0x7FFFFFFF


class StoreUnavailable(DependencyUnavailable):
    """The shared-state database cannot be reached or used right now (retryable)."""


@dataclass(frozen=True)
class Migration:
    """One step of a store's schema: the same change written for each dialect.

    Steps are applied in `version` order per `component`, once per database. A step should be
    safe to run over a schema an earlier release created without recording it (``IF NOT
    EXISTS``), which is how a database made before migrations existed is adopted.
    """

    component: str
    version: int
    sqlite: str
    postgresql: str

    def script(self, dialect: Dialect) -> str:
        return self.sqlite if dialect == "sqlite" else self.postgresql


class Tx:
    """A transaction: statements with ``?`` placeholders, rows as dicts (column -> value)."""

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        raise NotImplementedError

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        raise NotImplementedError

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def fetchone(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None


class Database:
    """Where shared state lives; see the module docstring. Use one object per process."""

    dialect: Dialect
    read_only: bool

    def __init__(self) -> None:
        self._migrated: set[tuple[str, int]] = set()

    def transaction(self, *, lock: Lock = None) -> contextlib.AbstractAsyncContextManager[Tx]:
        """A write transaction; `lock` (a key, or several) serialises it with others naming
        the same key."""
        raise NotImplementedError

    def reading(self) -> contextlib.AbstractAsyncContextManager[Tx]:
        """A read-only transaction (one consistent snapshot)."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def migrate(self, migrations: Sequence[Migration]) -> list[str]:
        """Apply the steps not yet recorded in ``spine_schema``; return what was applied.

        Raises:
            StoreUnavailable: the database cannot be reached, or a step failed (named).
            PermissionError: the database was opened read-only.
        """
        wanted = {(m.component, m.version) for m in migrations}
        if wanted <= self._migrated:
            return []
        if self.read_only:
            raise PermissionError(f"{self} is open read-only; a worker applies its migrations")
        applied: list[str] = []
        async with self.transaction(lock="spine_schema") as tx:
            await tx.execute(_SCHEMA_TABLE)
            done = {
                (r["component"], r["version"])
                for r in await tx.fetchall("SELECT component, version FROM spine_schema")
            }
            for step in sorted(migrations, key=lambda m: (m.component, m.version)):
                key = (step.component, step.version)
                if key in done:
                    continue
                for statement in _statements(step.script(self.dialect), self.dialect):
                    try:
                        await tx.execute(statement)
                    except StoreUnavailable as err:
                        raise StoreUnavailable(
                            f"{self}: migration {step.component} v{step.version} failed: "
                            f"{err.message}"
                        ) from err
                await tx.execute(
                    "INSERT INTO spine_schema (component, version, applied_at) VALUES (?, ?, ?)",
                    (step.component, step.version, datetime.now(UTC).isoformat()),
                )
                applied.append(f"{step.component} v{step.version}")
        self._migrated |= wanted
        return applied


_SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS spine_schema (
    component  TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    applied_at TEXT    NOT NULL,
    PRIMARY KEY (component, version)
)"""


def _statements(script: str, dialect: Dialect) -> list[str]:
    """A script as single statements (SQLite runs one at a time; PostgreSQL takes it whole)."""
    if dialect == "postgresql":
        return [script]
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return [s for s in statements if s.strip(" ;\n")]


async def _uncancellable(work: Awaitable[T]) -> T:
    """Await `work` to its end even if the caller is cancelled meanwhile (then re-raise the
    cancellation): a COMMIT under way on the store's thread must finish before the connection
    is used again."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --- SQLite ----------------------------------------------------------------------------------


class SQLiteDatabase(Database):
    """A SQLite file; see the module docstring.

    Commits are fully synchronous: an append the workflow saw succeed must survive a power cut.
    With ``synced=False`` (best-effort data, e.g. live streams) they are not synced
    (``synchronous=NORMAL`` in WAL mode: they survive a crash of the process, not of the
    machine; a commit still runs on the store's thread, as a WAL checkpoint may sync). The
    connection is kept open (closing the last connection to a WAL database checkpoints it,
    several fsyncs) and used from one thread of its own, one transaction at a time.
    """

    dialect: Dialect = "sqlite"

    def __init__(self, path: Path, *, read_only: bool = False, synced: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.read_only = read_only
        self.synced = synced
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"no database at {str(self.path)!r}")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._guard = threading.Lock()
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def __str__(self) -> str:
        return f"sqlite:///{self.path}"

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        with self._guard:
            lock = self._locks.get(loop)
            if lock is None:
                self._locks = {k: v for k, v in self._locks.items() if not k.is_closed()}
                lock = self._locks[loop] = asyncio.Lock()
            return lock

    def _connection(self) -> sqlite3.Connection:
        """The store's connection, opened on first use; used by one transaction at a time
        (the store's lock), from the event loop or the store's thread."""
        if self._db is None:
            if self.read_only:
                target, uri = f"{self.path.resolve().as_uri()}?mode=ro", True
            else:
                target, uri = str(self.path), False
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE), nothing implicit.
            db = sqlite3.connect(
                target, uri=uri, timeout=30, isolation_level=None, check_same_thread=False
            )
            db.row_factory = sqlite3.Row
            if not self.read_only:
                db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.synced else 'NORMAL'}")
            self._db = db
        return self._db

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` on the connection, SQLite errors as :class:`StoreUnavailable`."""
        try:
            return fn(self._connection())
        except sqlite3.Error as err:  # locked past the busy timeout, disk I/O, damage
            if self._db is not None and not self._db.in_transaction:
                # Start the next call on a fresh connection, not one in an unknown state.
                self._db.close()
                self._db = None
            raise StoreUnavailable(f"database {self} unavailable: {_first_line(err)}") from err

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` on the store's own thread: for what may wait (a lock held by another process,
        an fsync), so the event loop never does."""
        return await asyncio.get_running_loop().run_in_executor(self._executor(), self._call, fn)

    def _executor(self) -> ThreadPoolExecutor:
        with self._guard:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{self.path.name}")
            return self._thread

    async def _begin(self, begin: str) -> None:
        """Start a transaction: at once on the event loop when the file is free (the usual
        case), else on the store's thread, waiting up to the busy timeout."""

        def at_once(db: sqlite3.Connection) -> bool:
            db.execute("PRAGMA busy_timeout = 0")
            try:
                db.execute(begin)
                return True
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err):
                    raise
                return False
            finally:
                db.execute("PRAGMA busy_timeout = 30000")

        if not self._call(at_once):
            await self._run(lambda db: db.execute(begin))

    @contextlib.asynccontextmanager
    async def _transaction(self, begin: str, durable: bool) -> AsyncIterator[Tx]:
        # One transaction at a time on the connection. Statements run on the event loop (they
        # touch pages in memory: microseconds); a durable COMMIT (fsync) runs on the store's
        # thread: one thread hop per write, none per read.
        async with self._lock():
            await self._begin(begin)
            try:
                yield _SQLiteTx(self)
            except BaseException:
                self._rollback()
                raise
            try:
                if durable:
                    await _uncancellable(self._run(lambda db: db.execute("COMMIT")))
                else:
                    self._call(lambda db: db.execute("COMMIT"))
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        def rollback(db: sqlite3.Connection) -> None:
            if db.in_transaction:
                db.execute("ROLLBACK")

        with contextlib.suppress(StoreUnavailable):
            self._call(rollback)

    def transaction(self, *, lock: Lock = None) -> contextlib.AbstractAsyncContextManager[Tx]:
        if self.read_only:
            raise PermissionError(f"{self} is open read-only")
        # IMMEDIATE takes the write lock before reading, so two writers (from any process)
        # cannot both read the same state and then both write.
        return self._transaction("BEGIN IMMEDIATE", durable=True)

    def reading(self) -> contextlib.AbstractAsyncContextManager[Tx]:
        return self._transaction("BEGIN", durable=False)

    async def close(self) -> None:
        """Close the connection and its thread; a later call opens them again."""

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        with self._guard:
            thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(thread, close)
            thread.shutdown(wait=False)


class _SQLiteTx(Tx):
    def __init__(self, database: SQLiteDatabase) -> None:
        self._database = database

    async def execute(self, sql: str, params: Params = ()) -> int:
        return self._database._call(lambda db: db.execute(sql, tuple(params)).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        self._database._call(lambda db: db.executemany(sql, [tuple(r) for r in rows]))

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        return self._database._call(
            lambda db: [dict(r) for r in db.execute(sql, tuple(params)).fetchall()]
        )


# --- PostgreSQL ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresDatabase(Database):
    """A PostgreSQL database (14 or later); see the module docstring.

    The pool (``min_size`` 1, up to `max_connections`) opens on first use; call :meth:`close`.
    """

    dialect: Dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        read_only: bool = False,
        max_connections: int = 10,
        timeout_s: float = 10.0,
    ) -> None:
        super().__init__()
        if not (importlib.util.find_spec("psycopg") and importlib.util.find_spec("psycopg_pool")):
            raise ImportError(
                "the PostgreSQL store needs psycopg 3 and its pool: "
                "pip install 'psycopg[binary,pool]'"
            )
        self.url = url
        self.read_only = read_only
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._pool: AsyncConnectionPool | None = None
        self._opening: asyncio.Lock | None = None

    def __str__(self) -> str:
        return redact_url(self.url)

    async def _get_pool(self) -> AsyncConnectionPool:
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                from psycopg.rows import dict_row
                from psycopg_pool import AsyncConnectionPool

                pool = AsyncConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self.max_connections,
                    timeout=self.timeout_s,
                    open=False,
                    kwargs={
                        "connect_timeout": max(1, int(self.timeout_s)),
                        "row_factory": dict_row,
                    },
                )
                await pool.open(wait=False)
                self._pool = pool
        return self._pool

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        """Map connection trouble to :class:`StoreUnavailable`, naming the database."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            yield
        except psycopg.errors.UndefinedTable as err:
            raise StoreUnavailable(
                f"database {self} has no table for this yet ({_first_line(err)}); a worker "
                "creates the tables when it starts"
            ) from err
        except (psycopg.Error, PoolTimeout) as err:  # down, refused, permissions
            raise StoreUnavailable(f"database {self} unavailable: {_first_line(err)}") from err

    @contextlib.asynccontextmanager
    async def _transaction(self, lock: Lock, read_only: bool) -> AsyncIterator[Tx]:
        keys = [lock] if isinstance(lock, str) else sorted(set(lock or ()))
        async with self._errors():
            pool = await self._get_pool()
            async with pool.connection() as conn, conn.transaction():
                if read_only:
                    await conn.execute("SET TRANSACTION READ ONLY")
                # Several keys are taken in one order, so two writers cannot each hold one the
                # other waits for (two keys of one hash could still; PostgreSQL then fails one
                # transaction as a deadlock, which is StoreUnavailable, and its caller retries).
                for key in keys:
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (PG_LOCK_CLASS, key)
                    )
                yield _PgTx(conn)

    def transaction(self, *, lock: Lock = None) -> contextlib.AbstractAsyncContextManager[Tx]:
        if self.read_only:
            raise PermissionError(f"{self} is open read-only")
        return self._transaction(lock, False)

    def reading(self) -> contextlib.AbstractAsyncContextManager[Tx]:
        return self._transaction(None, True)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


class _PgTx(Tx):
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        cur = await self._conn.execute(_pg_sql(sql) if params else sql, tuple(params) or None)
        return cur.rowcount

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        if rows:
            async with self._conn.cursor() as cur:
                await cur.executemany(_pg_sql(sql), [tuple(r) for r in rows])

    async def fetchall(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        cur = await self._conn.execute(_pg_sql(sql) if params else sql, tuple(params) or None)
        return list(await cur.fetchall())  # type: ignore[arg-type]  # dict_row


# --- configuration ---------------------------------------------------------------------------


def open_database(url: str, *, read_only: bool = False) -> Database:
    """The database a URL names: ``postgresql://`` (or ``postgres://``) or ``sqlite:///PATH``.

    ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db``, as SQLAlchemy spells them.

    Raises:
        ValueError: another scheme.
        FileNotFoundError: `read_only` and the SQLite file does not exist.
    """
    url = url.strip()
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, read_only=read_only)
    if url.startswith("sqlite:///"):
        return SQLiteDatabase(Path(url.removeprefix("sqlite:///")), read_only=read_only)
    raise ValueError(
        f"database URL {redact_url(url)!r} is not supported; use postgresql://USER@HOST/DB or "
        "sqlite:///PATH"
    )


def database_from_env(
    env: Mapping[str, str], state_dir: Path | None = None, *, read_only: bool = False
) -> Database:
    """``SPINE_DATABASE_URL``, else SQLite at ``state_dir/state.db`` (``SPINE_STATE_DIR``).

    Raises:
        ValueError: an unsupported URL. FileNotFoundError: `read_only` and no SQLite file yet.
    """
    url = (env.get("SPINE_DATABASE_URL") or "").strip()
    if url:
        try:
            return open_database(url, read_only=read_only)
        except ValueError as err:
            raise ValueError(f"SPINE_DATABASE_URL: {err}") from None
    root = Path(state_dir) if state_dir is not None else state_dir_from_env(env)
    return SQLiteDatabase(root / DEFAULT_STATE_DB, read_only=read_only)


def state_dir_from_env(env: Mapping[str, str]) -> Path:
    """``SPINE_STATE_DIR``, default ``.spine``."""
    return Path(env.get("SPINE_STATE_DIR") or ".spine")


def shared_database(env: Mapping[str, str]) -> bool:
    """Whether ``SPINE_DATABASE_URL`` names a database (every worker and the CLI share it)."""
    return bool((env.get("SPINE_DATABASE_URL") or "").strip())
