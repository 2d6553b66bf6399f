"""The one owner of INC's measurement format: rank files, scale files, the meta sidecar, unify/expand.

    naming     file names  <prefix>_hooks_maxabs[_<METHOD>][_<rank>_<world>]{.json,.npz,_mod_list.json}
    npz        the NPZ container, unpickled only through an allow-list
    rankfile   one rank's JSON + NPZ + mod_list (RankFile)
    runset     the N rank files of one run in a directory (MeasurementSet)
    meta       the ray_calib_meta.json sidecar (RunMeta)
    coverage   coverage.json, tokens per routed expert (ExpertCoverage)
    unify      TP N -> M re-sharding and expert-parallel expansion
    postprocess  cache-read matmul and SDPA-output alignment of INC's Gaudi measurements (upstream step 3)
    pipeline   directory-level unify/expand/inspect used by the CLI
"""

from ray_calib.measurements.coverage import ExpertCoverage, read_coverage, write_coverage
from ray_calib.measurements.meta import META_FILE, RunMeta, read_meta, write_meta
from ray_calib.measurements.naming import StatsName, parse_name
from ray_calib.measurements.rankfile import MODE_RANGE, MODE_SCALE, RankFile, read_rank_file, write_rank_file
from ray_calib.measurements.runset import MeasurementSet, scale_methods
from ray_calib.measurements.unify import expand_rank, expert_child, expert_layout, unify_ranks

__all__ = [
    "META_FILE", "MODE_RANGE", "MODE_SCALE", "ExpertCoverage", "MeasurementSet", "RankFile", "RunMeta",
    "StatsName", "expand_rank", "expert_child", "expert_layout", "parse_name", "read_coverage", "read_meta", "read_rank_file",
    "scale_methods", "unify_ranks", "write_coverage", "write_meta", "write_rank_file",
]
