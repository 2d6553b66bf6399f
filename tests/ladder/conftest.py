"""The cluster tests' sshd and work dirs, shared with the ladder's tests."""

from tests.cluster.conftest import sshd, state_dir, workdir  # noqa: F401
