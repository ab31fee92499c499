"""Atomic output: everything is written into a hidden folder beside the destination, renamed into place at the end.

An interrupted or failed run removes its staging folder and leaves the destination as it was; even a killed run
leaves only a hidden `.NAME.partial-PID-*` folder, never a half-written destination. The next conversion to the same
destination removes such a folder once the process named in it is gone, and says so.
"""

import glob
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mlx_gemma4.errors import Gemma4Error


def check_destination(destination: Path, replace: bool):
    if destination.exists() and not replace:
        raise Gemma4Error(f"{destination} already exists; pass --force to replace it")


@contextmanager
def staged_folder(destination: Path, replace: bool):
    check_destination(destination, replace)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{staging_prefix(destination)}{os.getpid()}-", dir=destination.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        yield staging
        check_destination(destination, replace)
        if destination.exists():
            retired = destination.with_name(f".{destination.name}.replaced-{os.getpid()}")
            destination.rename(retired)
            staging.rename(destination)
            remove(retired)
        else:
            staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def staging_prefix(destination: Path) -> str:
    return f".{destination.name}.partial-"


def process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(destination: Path) -> list:
    """Removes the staging folders a killed conversion to `destination` left behind (the process named in their
    name is gone); returns one line per folder removed, or seen and left alone because it is not plainly ours."""
    prefix = staging_prefix(destination)
    ours = re.compile(re.escape(prefix) + r"(\d+)-[a-z0-9_]+")
    notes = []
    if not destination.parent.is_dir():
        return notes
    for path in sorted(destination.parent.glob(f"{glob.escape(prefix)}*")):
        match = ours.fullmatch(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            notes.append(f"note: left {path} alone: it looks like an unfinished conversion's staging folder, "
                         "but not one this converter names; remove it yourself if no conversion is running")
        elif not process_is_running(int(match.group(1))):
            size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())
            shutil.rmtree(path)
            notes.append(f"note: removed {path} ({size / 1e6:.1f} MB), left by a conversion that was killed")
    return notes


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
