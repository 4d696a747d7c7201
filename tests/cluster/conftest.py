"""The cluster tier: a real SLURM (Debian's packages), started once per session, two simulated nodes.

``slurm`` installs the packages when they are missing (apt-get, as root), starts
``slurmctld`` and two ``slurmd`` (``tests/cluster/_slurm.py``) and, at the end of
the session, also after a failure, cancels every job and stops exactly the
daemons it started, by pid. The tier is skipped, with the reason printed, only
where the packages cannot be installed at all (no apt-get, not root, no
package source).
"""

from __future__ import annotations

import sys

import pytest

from tests.cluster._slurm import LocalSlurm, SlurmUnavailable, ensure_installed


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        print(f"\n[cluster] skipping the SLURM tests: {exc}", file=sys.stderr)
        pytest.skip(f"SLURM cannot be installed here: {exc}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
