"""Atomic output: everything is written into a hidden folder beside the destination, renamed into place at the end.

An interrupted or failed run removes its staging folder and leaves the destination as it was; even a killed run
leaves only a hidden `.NAME.partial-*` folder, never a half-written destination.
"""

import os
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
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
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


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
