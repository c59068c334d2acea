"""The disk under the store: the space a run's results need, checked before any work, and
the file-system faults met while writing (disk full, quota, read-only, permission) told
as one message that names the store and what the run needs.

The result arrays are preallocated at their full size (`tasks.sample.sampling`), so the space
they take is known before the fit starts: float32 draws, [S] to [S, C, T, K] per output,
counted here before compression (random draws barely compress). A run whose results do
not fit the free space is refused in pre-flight, before it writes anything.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import zarr

from bayesdream_model.distributions import get_family
from tasks.errors import InsufficientSpaceError, StoreWriteError
from tasks.groups import read_groups
from tasks.sample.sampling import output_shape
from tasks.store import inputs_key, is_complete, results_key

FLOAT32 = 4  # bytes of a result entry
#: the faults a run cannot get past by itself; other OSErrors are bugs, shown as they are
SPACE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT})
ACCESS_FAULTS = frozenset({errno.EROFS, errno.EACCES})
RESUMES = "finished steps are kept and the run resumes where it stopped"


def results_bytes(
    distribution: str, *, n_samples: int, n_groups: int, matrix_shape: tuple[int, ...]
) -> int:
    """Bytes of a modality's preallocated result arrays (float32, before compression);
    `matrix_shape` is its counts matrix's, (T, N(, K))."""
    n_features = int(matrix_shape[0])
    n_categories = int(matrix_shape[2]) if len(matrix_shape) > 2 else None
    shape_args = (n_samples, n_groups, n_features, n_categories)
    outputs = get_family(distribution).outputs()
    return FLOAT32 * sum(math.prod(output_shape(out, *shape_args)) for out in outputs)


def chunk_bytes(path: Path) -> int:
    """Bytes of the array chunks under `path` (files under a `c/` folder; 0 when absent):
    the results written so far, without the arrays' metadata."""
    total = 0
    for folder, _, files in os.walk(path):
        if "c" not in Path(folder).relative_to(path).parts:
            continue
        for name in files:
            with contextlib.suppress(OSError):  # a chunk being replaced
                total += os.stat(os.path.join(folder, name)).st_size
    return total


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds `path`, or would: its nearest existing folder."""
    probe = Path(path).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def still_to_write(store: Path, name: str, planned: int) -> int:
    """Bytes of `planned` results not on disk yet: an earlier, unfinished results group is
    either resumed (its chunks count as written) or replaced (its space is freed first)."""
    return max(0, planned - chunk_bytes(Path(store) / results_key(name)))


def check_free_space(store: Path, pending: int, detail: str) -> None:
    """Refuse a run whose results cannot fit the disk: `pending` bytes still to write,
    `detail` what they are (shapes), for the message."""
    free = free_bytes(store)
    if pending <= free:
        return
    raise InsufficientSpaceError(
        f"Store '{store}': the results need {size(pending)} more on its disk "
        f"({detail}; float32 before compression), but only {size(free)} is free there. "
        f"Free at least {size(pending - free)} there, give `store:` a folder on a disk "
        "with room, or draw fewer samples (`fit.nsamples`); nothing was written."
    )


def size(n_bytes: float) -> str:
    """'1.23 GB', '45.6 MB' below a gigabyte, '7.8 kB' below a megabyte."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.2f} GB"
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.1f} kB"


def stored_needs(store: Path) -> dict[str, tuple[int, int]] | None:
    """{modality: (bytes still to write, bytes in all)} of the results, from what the
    store records (its config, groups and ingested matrices); None when it cannot tell."""
    try:
        root = zarr.open_group(str(store), mode="r")
        config = root.attrs["config"]
        nsamples, n_groups = int(config["fit"]["nsamples"]), len(read_groups(root).labels)
        needs = {}
        for name in config["modalities"]:
            if inputs_key(name) not in root or is_complete(root, results_key(name)):
                continue
            group = root[inputs_key(name)]
            planned = results_bytes(
                group.attrs["distribution"],
                n_samples=nsamples,
                n_groups=n_groups,
                matrix_shape=group["counts"].shape,
            )
            needs[name] = (still_to_write(store, name, planned), planned)
        return needs
    except Exception:  # a message's detail: never a second failure
        return None


@contextlib.contextmanager
def store_faults(store: Path) -> Iterator[None]:
    """Turn a file-system fault met in the body into a `StoreWriteError` that names the
    store and what the run needs (other errors pass unchanged)."""
    try:
        yield
    except OSError as err:
        fault = file_system_fault(err, store)
        if fault is None:
            raise
        raise fault from err


def file_system_fault(err: OSError, store: Path | None = None) -> StoreWriteError | None:
    """The one-message account of a disk-full / quota / read-only / permission fault
    (None for any other error). With `store`, a fault at the store's location names it
    and says how much space it still needs."""
    if err.errno not in SPACE_FAULTS | ACCESS_FAULTS:
        return None
    reason = err.strerror or os.strerror(err.errno)
    path = failed_file(err)
    if store is not None and (path is None or _at_store(path, Path(store))):
        where = _where(path, Path(store))
        if err.errno in SPACE_FAULTS:
            return StoreWriteError(_space_message(err.errno, reason, Path(store), where))
        return StoreWriteError(_access_message(err.errno, reason, Path(store), where))
    what = f"'{path}'" if path is not None else "a file"
    if err.errno in SPACE_FAULTS:
        fix = "Free space there"
    elif err.errno == errno.EROFS:
        fix = "Use a location on a writable disk"
    else:
        fix = f"Give user {user_name()} access to it"
    return StoreWriteError(f"{reason}: {what}. {fix} and rerun.")


def _space_message(code: int, reason: str, store: Path, where: str) -> str:
    """Disk full or quota used up: what is free, what the results still need, the rerun."""
    needs = stored_needs(store) or {}
    pending = sum(left for left, _ in needs.values())
    total = sum(planned for _, planned in needs.values())
    state = "" if code == errno.EDQUOT else f": {size(free_bytes(store))} free there"
    if pending:
        state += f"; the results still to be written need about {size(pending)} (of {size(total)})"
    room = f"at least {size(pending)}" if pending else "space"
    fix = (
        f"Free {room} within your quota there, or ask for a larger quota,"
        if code == errno.EDQUOT
        else f"Free {room} there"
    )
    return (
        f"{reason} while writing the store '{store}'{where}{state}. {fix} and rerun the "
        f"same command: {RESUMES}."
    )


def _access_message(code: int, reason: str, store: Path, where: str) -> str:
    """Read-only or not writable: where the run may write instead."""
    example = "(e.g. --set store=/scratch/run.zarr)"
    if code == errno.EROFS:
        fix = f"Give `store:` a folder on a writable disk {example} and rerun"
    else:
        fix = (
            f"Make '{store.parent}' and the store writable for user {user_name()} and rerun "
            f"the same command ({RESUMES}), or give `store:` a folder you may write to "
            f"{example}"
        )
    return f"Cannot write the store '{store}'{where}: {reason}. {fix}."


def failed_file(err: OSError) -> Path | None:
    """The file the fault is about: the error's `filename`, or, for a failed write(2),
    which names no file, the innermost `path` of the frames it passed (zarr's local store
    writes a chunk through a function of `path`)."""
    if err.filename is not None:
        return Path(os.fsdecode(err.filename))
    found, frame = None, err.__traceback__
    while frame is not None:
        value = frame.tb_frame.f_locals.get("path")
        if isinstance(value, str | os.PathLike):
            found = Path(value)
        frame = frame.tb_next
    return found


def _at_store(path: Path, store: Path) -> bool:
    """`path` is in the store, is the store, or is beside it as one of its own files
    (the lock `<store>.lock`)."""
    path, store = path.absolute(), store.absolute()
    beside = path.parent == store.parent and path.name.startswith(store.name + ".")
    return path == store or store in path.parents or beside


def _where(path: Path | None, store: Path) -> str:
    """`(at 'technical/gene/alpha_y')` for a file in the store, `(file '...')` beside it."""
    if path is None:
        return ""
    path, store = path.absolute(), store.absolute()
    return f" (at '{_key(path, store)}')" if store in path.parents else f" (file '{path}')"


def _key(path: Path, store: Path) -> str:
    """The store key of a chunk or metadata file in the store (`technical/gene/alpha_y`)."""
    parts = list(path.relative_to(store).parts)
    if parts and parts[-1].startswith("zarr."):
        parts.pop()  # zarr.json, or its temporary copy
    if "c" in parts:  # a chunk: <array>/c/<i>/<j>/...
        at = len(parts) - 1 - parts[::-1].index("c")
        if at + 1 < len(parts) and all(p.isdigit() for p in parts[at + 1 :]):
            parts = parts[:at]
    return "/".join(parts) or "/"


def user_name() -> str:
    """The login name, or the uid where there is none."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
