"""One run at a time per ``output_dir`` + each name its files take (``output_name``, ``token_string``), and the
leftovers of killed runs.

``RunLock`` takes ``<output_dir>/<output_name>.lock`` before a run writes anything: the file is
created if needed and locked with ``flock`` (exclusive, non-blocking), and holds the owner's
process id and host. A second run into the same place finds the lock held and is refused at
start, naming the running process. The operating system drops the lock when its process dies,
however it dies, so a lock file left by a killed run (SIGKILL, power loss) is recognised as stale,
named in a warning and taken over. The lock file is removed when the run ends.

``RunLocks`` takes one such lock for every name a run's files start with: its ``output_name`` (the LoRA, config,
log, states) and its ``token_string`` (the embedding files), so two runs in one folder that differ in one of them
but share the other are refused at start too (before, the later run's final save met the earlier run's embedding
and was refused, losing every step it had trained). Each lock file records the key its run uses the name for.

``exclusive_while_made`` is the blocking counterpart for a product several processes may start to
make at once (a sweep's regularisation images): the second waits for the first, then finds the
product made.

While holding the lock, ``clean_leftover_temporaries`` removes the hidden temporary files
(``.<name>.<random>.tmp`` files and ``.<name>-state-*`` folders) that a killed run's atomic writes
left behind for this run's names; they are incomplete by construction, and each is named. The one exception is a
complete state folder an ``overwrite`` save moved aside (``.<state>.old<hex>``) to put its new one in its place: when
nothing holds the state's name (the run was killed between the two renames), it is put back instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from .config import ConfigError

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is then the file's existence (O_EXCL)
    fcntl = None


class RunLock:
    """The exclusive claim of one run on ``output_dir/output_name``; use as a context manager."""

    def __init__(self, output_dir: Path, output_name: str, key: str = "output_name"):
        self.path = Path(output_dir) / f"{output_name}.lock"
        self.key = key  # what the run uses the name for: "output_name" or "token_string"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``ConfigError`` naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only when another process removed the file between open and lock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL), 0o644)
            except FileExistsError:  # no flock (Windows): a held lock and one a killed run left look the same
                raise ConfigError(
                    f"the lock file {self.path} exists: another run is writing to {self.path.parent} with {self.key} "
                    f"{self.path.stem!r}, or one was killed there; wait for it, or delete the file if no run is "
                    "writing there"
                ) from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    owner, held_as = _read_owner(fd), _read_key(fd)
                    os.close(fd)
                    clash = ("" if held_as == self.key else
                             f", whose files this run's {self.key} {self.path.stem!r} would overwrite")
                    raise ConfigError(
                        f"another run is writing to {self.path.parent} with {held_as} {self.path.stem!r} "
                        f"({owner}; lock file {self.path}){clash}; wait for it to finish, or choose another "
                        f"{self.key} or output_dir"
                    ) from None
                if not _same_file(fd, self.path):
                    os.close(fd)
                    continue
            self._fd = fd  # held: from here release() removes the file, also when a signal stops the write below
            try:
                stale = _read_owner(fd, default="")
                if stale:
                    logger.warning("taking over the lock %s left by %s, which is no longer running", self.path, stale)
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "key": self.key}).encode())
                os.fsync(fd)
            except BaseException:
                self.release()
                raise
            return
        raise ConfigError(f"could not take the lock {self.path}: other runs keep replacing it")

    def release(self) -> None:
        if self._fd is None:
            return
        if fcntl is None:  # Windows: an open file cannot be removed; without flock, no lock races the removal
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunLocks:
    """The :class:`RunLock` of each name a run's files start with (``{"output_name": ..., "token_string": ...}``),
    taken in order; when one is held by another run, those already taken are released and its error raised."""

    def __init__(self, output_dir: Path, names: dict[str, str]):
        self.locks = [RunLock(output_dir, name, key) for key, name in names.items()]

    def acquire(self) -> None:
        taken: list[RunLock] = []
        try:
            for lock in self.locks:
                lock.acquire()
                taken.append(lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise

    def release(self) -> None:
        """Release every lock, each even when releasing another failed (the first failure is raised after)."""
        failures = []
        for lock in reversed(self.locks):
            try:
                lock.release()
            except OSError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


@contextlib.contextmanager
def exclusive_while_made(lock_path: Path):
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed), waiting for another holder to
    finish; check whether the product exists *inside* the block. Without ``flock`` (Windows) it does not wait."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_owner(fd: int, default: str = "a process that did not say which") -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"process {owner['pid']} on {owner['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return default


def _read_key(fd: int) -> str:
    """The key the lock's holder uses its name for (lock files written before this was recorded: ``output_name``)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        key = json.loads(os.read(fd, 4096).decode("utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return "output_name"
    return key if key in ("output_name", "token_string") else "output_name"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _leftover_pattern(output_name: str, token: str) -> re.Pattern:
    """Hidden temporaries of this run's names: ``.<final>.<random>.tmp`` files and ``.<state>.<random>`` folders."""
    name, tok = re.escape(output_name), re.escape(token)
    step = r"(?:-(?:interrupted-)?step\d{8})?"
    finals = [f"{name}{step}\\.safetensors", f"{tok}{step}\\.safetensors", f"{name}\\.config\\.toml",
              f"{name}\\.log\\.jsonl"]
    return re.compile(rf"^\.(?:(?:{'|'.join(finals)})\.[A-Za-z0-9_]+\.tmp|{name}-state-(?:interrupted-)?step\d{{8}}\.[A-Za-z0-9_]+)$")


def _put_back(child: Path) -> bool:
    """Whether ``child`` is a complete state folder that an ``overwrite`` save moved aside (``.<state>.old<8 hex>``) to
    put the new one in its place, and was killed before it could: then nothing holds the state's name, and the folder
    is renamed back (before, it was removed with the temporaries, and the state of that step was lost)."""
    from .resume import STATE_FILES

    match = re.fullmatch(r"\.(.+)\.old[0-9a-f]{8}", child.name)
    if match is None or not child.is_dir() or not all((child / name).is_file() for name in STATE_FILES):
        return False  # a part of one (killed while its removal ran, once the new state had its name) is a temporary
    final = child.with_name(match.group(1))
    if final.exists() or final.is_symlink():
        return False
    os.replace(child, final)
    logger.warning("put back %s, a state folder an earlier run moved aside to replace it and was killed before it "
                   "could (overwrite = true)", final)
    return True


def clean_leftover_temporaries(output_dir: Path, output_name: str, token: str) -> list[Path]:
    """Remove the hidden temporaries a killed run's atomic writes left for this run's names (call
    only while holding the run's lock: then no live process is writing them); return what was removed."""
    removed: list[Path] = []
    if not output_dir.is_dir():
        return removed
    pattern = _leftover_pattern(output_name, token)
    for child in sorted(output_dir.iterdir()):
        if not pattern.match(child.name) or child.is_symlink():
            continue
        if _put_back(child):
            continue
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child)
        logger.warning("removed %s, an incomplete temporary left by an earlier run that was killed while saving", child)
    return removed
