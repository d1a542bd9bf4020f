"""Files on disk: temporary folders beside a destination, normal permissions, stale leftovers, clear path errors.

Every folder peftfx writes (adapter folders, ONNX exports) is built in a temporary folder beside the destination
and renamed into place, so an interrupted write never leaves a partial destination. What an interruption (kill -9,
power loss) can leave is the temporary folder itself. Their names say who made them::

    .peftfx-tmp-p<pid>-<random>          an adapter folder being written
    .peftfx-export-p<pid>-<random>       an ONNX export being written and verified
    <name>.peftfx-old-p<pid>-<random>    the previous <name>, moved aside for the instant of the swap

(and the same names without ``-p<pid>`` from peftfx versions before they carried the writer's process id). The
next save or export into the same folder removes the ones that are *stale*: the name matches exactly one of these
forms, and either the process id in it is no longer running and the entry is older than the current process, or
(for names without a process id) the entry is older than the current process. Anything else — user files, a
temporary folder of a save still running in another process — is never touched. A stale ``<name>.peftfx-old…``
whose ``<name>`` is missing (the writer died between the two renames of the swap) is renamed back to ``<name>``
rather than removed, so the previous version is never lost.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time

from ._errors import PeftfxError

__all__ = ["make_temp_dir", "swap_into_place", "clean_stale", "normal_mode", "path_problem", "PROCESS_START"]

log = logging.getLogger(__name__)

PROCESS_START = time.time()     # nothing this process wrote predates this (set when peftfx is first imported)

_RAND = "[a-z0-9_]{8}"
_TEMP = re.compile(rf"^\.peftfx-(?P<kind>tmp|export)-(?:p(?P<pid>\d+)-{_RAND}|{_RAND})$")
_OLD = re.compile(rf"^(?P<name>.+)\.peftfx-old(?:-p(?P<pid>\d+)-{_RAND})?$")


def _suffix() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_"
    return f"p{os.getpid()}-" + "".join(secrets.choice(alphabet) for _ in range(8))


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)          # no /proc: read it by setting it (restored at once)
    os.umask(mask)
    return mask


def normal_mode(path: str) -> None:
    """Give a folder we wrote, and the files in it, the permissions ``mkdir``/``open`` would: 0o777 / 0o666 minus
    the umask (0755 / 0644 under the usual 022). Private temporary folders are 0700 and safetensors writes 0600."""
    mask = _umask()
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            full = os.path.join(root, f)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~mask)


def path_problem(path: str, e: OSError) -> str:
    """Why ``path`` cannot be written, naming the real path (never a temporary name): a parent that is a file,
    a folder without write permission, a full disk …"""
    path = os.path.abspath(path)
    probe = os.path.dirname(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if probe and os.path.exists(probe) and not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    if probe and os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK):
        return f"no permission to write in {probe}"
    return e.strerror or str(e)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True                 # exists (another user's) or cannot tell: treat as running
    return True


def _stale(full: str, pid: str | None) -> bool:
    try:
        if os.lstat(full).st_mtime >= PROCESS_START:
            return False
    except OSError:
        return False
    return pid is None or not _alive(int(pid))


def clean_stale(parent: str) -> list[str]:
    """Remove stale peftfx leftovers in folder ``parent`` (see the module docstring); returns what was removed or
    restored. Never raises: cleaning is a courtesy, not part of the write."""
    done: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return done
    for name in names:
        full = os.path.join(parent, name)
        m = _TEMP.match(name)
        old = None if m else _OLD.match(name)
        if not (m or old) or os.path.islink(full) or not os.path.isdir(full):
            continue
        if not _stale(full, (m or old).group("pid")):
            continue
        try:
            target = os.path.join(parent, old.group("name")) if old else None
            if target is not None and not os.path.lexists(target):
                os.rename(full, target)
                log.warning("restored %s from %s, left by a save that was interrupted", target, full)
            else:
                shutil.rmtree(full)
                log.info("removed %s, left by an interrupted save or export", full)
            done.append(full)
        except OSError as e:        # pragma: no cover - another process got there first, or no permission
            log.debug("could not clean %s: %s", full, e)
    return done


def make_temp_dir(path: str, kind: str, error: type[PeftfxError], what: str) -> str:
    """A fresh temporary folder beside ``path`` (``kind``: "tmp" or "export"), after cleaning stale leftovers there;
    an unwritable place raises ``error`` naming ``path`` and why (``what``: "the adapter", "the ONNX model")."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        clean_stale(parent)
        tmp = os.path.join(parent, f".peftfx-{kind}-{_suffix()}")
        os.mkdir(tmp, 0o700)
    except OSError as e:
        raise error(f"cannot write {what} to {path}: {path_problem(path, e)}. Choose a path in a folder you can "
                    "write to.") from None
    return tmp


def swap_into_place(tmp: str, path: str, error: type[PeftfxError]) -> None:
    """Rename folder ``tmp`` to ``path``; an existing folder at ``path`` is moved aside first and removed after,
    so ``path`` always holds a complete folder (old or new) except for the instant between two renames."""
    normal_mode(tmp)
    if os.path.isdir(path) and not os.path.islink(path):
        old = f"{path}.peftfx-old-{_suffix()}"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    elif os.path.lexists(path):
        raise error(f"{path} exists and is not a folder; choose another path.")
    else:
        os.rename(tmp, path)


def write_files_into(out_dir: str, write, prefix: str) -> list[str]:
    """Files written by ``write(tmp)`` (which returns the folder it wrote them in, inside ``tmp``) into ``out_dir``,
    a folder that may hold other files: written whole into a private folder there first, then each file renamed
    into place (so no file is ever half-written). Returns the file names."""
    import tempfile

    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=out_dir)
    try:
        folder = write(tmp)
        names = sorted(os.listdir(folder))
        for name in names:
            os.replace(os.path.join(folder, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names
