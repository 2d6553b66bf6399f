"""The observers on a live vLLM model (see engine_checks.py): they only read, remove() undoes them, and MLA's
kv_b_proj input taken from the latent equals what kv_b_proj's own forward sees when a backend calls it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.measure.conftest import ARCH_BACKENDS, REPO, measure_env

pytestmark = pytest.mark.slow


def engine_checks(model, backend: str | None) -> dict:
    args = [sys.executable, str(REPO / "tests" / "measure" / "engine_checks.py"), str(model)] + (
        [backend] if backend else []
    )
    proc = subprocess.run(args, cwd=REPO, env=measure_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_observers_only_read_and_remove_restores_the_engine(tiny_models, arch, backend):
    result = engine_checks(tiny_models[arch], backend)
    assert result["backends"]["attention"] == [backend or "CPU_ATTN"]
    assert result["observed"] == result["plain"], "greedy tokens change under the observers"
    assert result["after_remove"] == result["plain"]
    assert result["state_restored"], result["state_diff"]
    if arch != "deepseek_v3":
        return
    observed, witness = result["kv_b_proj_observed"], result["kv_b_proj_forward_hook"]
    assert len(observed) == 4 and all(v > 0 for v in observed.values()), "kv_b_proj recorded on every layer"
    if backend == "CPU_MLA":  # its prefill calls kv_b_proj on every token: the two views must agree exactly
        assert witness == observed
    else:  # AMX_MLA folds kv_b_proj into its own weights and never calls it; where it does, they agree
        assert all(witness[name] == observed[name] for name in witness)
