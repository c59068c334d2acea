"""Run the technical-fit flow in a child process, for tests/flows/test_resume.py to kill.

    python tests/flows/_run_flow.py CONFIG [KEY=VALUE ...]

`BAYESDREAM_CODE_VERSION`, when set, pins the code version that the step fingerprints
hash: the parent test and its children then agree on every fingerprint even if a source
file is edited while the test runs (the version is otherwise read from the files).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    """Run the flow on `argv[0]` with the `key=value` overrides that follow."""
    version = os.environ.get("BAYESDREAM_CODE_VERSION")
    if version:
        import tasks.fingerprint

        tasks.fingerprint.code_version = lambda: version
    from flows.technical_fit import technical_fit

    technical_fit(argv[0], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
