"""`bayesdream` in a child process whose disk fails, for tests/flows/test_disk_faults.py.

    python tests/flows/_cli_with_fault.py FAULT STORE run CONFIG [OPTIONS ...]

FAULT is `full-at-second-batch` (zarr's writes of the chunks of the second draw batch of
`technical/gene` fail as on a full disk: ENOSPC, which write(2) reports without a file
name) or `read-only` (every file opened for writing in the store's folder fails as on a
read-only mount: EROFS). The exit status is the command's.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path


def full_at_second_batch(store: Path) -> None:
    """zarr's local store writes every file through `_put(path, ...)`."""
    import zarr.storage._local as local

    real_put = local._put

    def put(path, value, exclusive=False):
        parts = Path(path).relative_to(store).parts if store in Path(path).parents else ()
        if parts[:2] == ("technical", "gene") and parts[3:5] == ("c", "1"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_put(path, value, exclusive=exclusive)

    local._put = put


def read_only(store: Path) -> None:
    """A read-only mount cannot be made without privileges: its writes fail the same way."""
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and Path(path).absolute().is_relative_to(store.parent):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    os.open = open_


FAULTS = {"full-at-second-batch": full_at_second_batch, "read-only": read_only}


if __name__ == "__main__":
    fault, store, *argv = sys.argv[1:]
    FAULTS[fault](Path(store))
    from flows.cli import main

    sys.exit(main(argv))
