"""The cluster lease on a real local Ray: one named actor per job and storage. The lock file
and the refused second local submit are in tests/unit/test_lease.py."""

import pytest

from tests.util import as_spec, digits_job, wait_until
from wrn_cluster import lease

pytestmark = pytest.mark.slow


def test_a_cluster_lease_is_one_named_actor_per_job_and_storage(tmp_path):
    import ray

    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False)
    try:
        spec = as_spec(digits_job(tmp_path / "data", tmp_path / "runs", name="leased"))
        other_storage = as_spec(
            digits_job(tmp_path / "data", tmp_path / "elsewhere", name="leased")
        )
        with lease.cluster_lease(spec, "submission leased-1"):
            refused = pytest.raises(lease.JobRunningError, match=r"\(submission leased-1\)")
            with refused, lease.cluster_lease(spec, "submission leased-2"):
                pass
            with lease.cluster_lease(other_storage, "another run folder"):
                pass

        def free() -> bool:
            try:
                with lease.cluster_lease(spec, "after the first ended"):
                    return True
            except lease.JobRunningError:
                return False

        wait_until(free, timeout=30, what="the lease to be free after its holder ended")
    finally:
        ray.shutdown()
