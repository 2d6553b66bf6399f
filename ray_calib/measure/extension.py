"""The vLLM worker extension (`LLM(worker_extension_cls=...)`) that runs the observers in each rank.

vLLM mixes this class into its worker; the head drives it with `llm.collective_rpc("<method>")`, which
returns one plain dict per rank (no pickled callables, no VLLM_ALLOW_INSECURE_SERIALIZATION). Stats
thus travel to the head over the executor's own channel (pipes for mp, Ray for ray): no shared FS.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray_calib.measure.observers import ModelObserver

EXTENSION_CLS = "ray_calib.measure.extension.MeasureExtension"


class MeasureExtension:
    model_runner: Any  # set by the vLLM worker this class is mixed into
    _ray_calib_observer: ModelObserver | None

    def ray_calib_install(
        self, fp8_kv: bool, block_names: list[str], block_types: list[str], hessians: bool | None = False
    ) -> dict[str, Any]:
        """Install observers on this rank's model; returns what was hooked (for the run's log)."""
        from ray_calib.measure.observers import Blocklist, ModelObserver

        old = getattr(self, "_ray_calib_observer", None)
        if old is not None:
            old.remove()
        observer = ModelObserver(
            self.model_runner.model,
            fp8_kv=fp8_kv,
            blocklist=Blocklist(names=tuple(block_names), types=tuple(block_types)),
            hessians=hessians,
        )
        self._ray_calib_observer = observer
        return {
            "rank": self._ray_calib_rank(),
            "modules": len(observer.mod_list),
            "moe_layers": len(observer.moe),
            "backends": observer.backends(),
            "uncovered": [[u.module, u.cls, u.kind] for u in observer.uncovered],
            "hessians": {
                "bytes": observer.hessian_bytes,
                "kept": observer.hessian_kept if observer.hessians is not None else 0,
                "recorded": observer.hessians is not None,
            },
        }

    def ray_calib_remove(self) -> None:
        """Take the observers out again: the engine then runs exactly as plain vLLM."""
        observer = getattr(self, "_ray_calib_observer", None)
        if observer is not None:
            observer.remove()
            self._ray_calib_observer = None

    def ray_calib_collect(self, reset: bool = True) -> dict[str, Any]:
        """This rank's stats since the last reset, as plain lists and floats."""
        observer = self._ray_calib_observer
        assert observer is not None, "ray_calib_install comes first"
        result = observer.collect()
        if reset:
            observer.reset()
        from vllm.distributed import get_tensor_model_parallel_world_size

        return {"rank": self._ray_calib_rank(), "world_size": get_tensor_model_parallel_world_size(), **result}

    def ray_calib_pid(self) -> int:
        return os.getpid()

    def _ray_calib_rank(self) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
