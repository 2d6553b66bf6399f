"""Transforms on INC measurements (the formats themselves live in `ray_calib.inc`), and the unify stage.

    unify        TP N -> M re-sharding and expert-parallel expansion (pure, in memory)
    merge        element-wise max of nodes, chunk merging
    postprocess  cache-read matmul and SDPA-output alignment of INC's Gaudi measurements (upstream step 3)
    match        which checkpoint weights a measurement covers (the rule `measure` checks and `quantize` uses)
    pipeline     directory-level unify/expand/inspect used by the CLI
    stage        the unify stage: a typed request, the run's record consulted and its target TP recorded
    hessians     input second moments of linear layers, for GPTQ rounding

Every stage that reads measurements (measure, scales, convert, report) uses these; they import only
`ray_calib.inc`, `ray_calib.model` and the core modules.
"""

from ray_calib.measurements.unify import expand_rank, unify_ranks

__all__ = ["expand_rank", "unify_ranks"]
