"""Intel Neural Compressor's formats: the one owner of what INC reads and writes, and of INC's scale rules.

    naming        file names  <prefix>_hooks_maxabs[_<METHOD>][_<rank>_<world>]{.json,.npz,_mod_list.json}
    npz           the NPZ container, unpickled only through an allow-list
    jsonio        fast JSON reading/writing of the stats files
    rankfile      one rank's JSON + NPZ + mod_list (RankFile)
    runset        the N rank files of one run in a directory (MeasurementSet)
    experts       the fused MoE ops of a rank file and its experts per rank (ExpertLayout)
    meta          the ray_calib_meta.json sidecar (RunMeta)
    coverage      coverage.json, tokens per routed expert (ExpertCoverage)
    optypes       INC's op types and the scale layout of each
    quant_config  QUANT_CONFIG: the six of the seeds' flow, schema validation, stale scale files
    arith         INC's bf16 HPU arithmetic (Gaudi) and float64 math (CPU/CUDA), in pure Python
    devices       full scale and HW scale table per device; device_for_scales rules; E5M2
    methods       the scale methods as data + pure functions (maxabs -> scale, weight -> scale)
    target        the INC release the files are for (rules that changed between releases)

Pure Python, no engine: every stage may import it; it imports only `ray_calib.model` and the core modules.
"""

from ray_calib.inc.coverage import ExpertCoverage, read_coverage, write_coverage
from ray_calib.inc.experts import ExpertLayout, expert_layout
from ray_calib.inc.meta import META_FILE, RunMeta, read_meta, write_meta
from ray_calib.inc.naming import MEASURE_PREFIX, StatsName, parse_name
from ray_calib.inc.rankfile import MODE_RANGE, MODE_SCALE, RankFile, read_rank_file, write_rank_file
from ray_calib.inc.runset import MeasurementSet, scale_methods

__all__ = [
    "MEASURE_PREFIX",
    "META_FILE",
    "MODE_RANGE",
    "MODE_SCALE",
    "ExpertCoverage",
    "ExpertLayout",
    "MeasurementSet",
    "RankFile",
    "RunMeta",
    "StatsName",
    "expert_layout",
    "parse_name",
    "read_coverage",
    "read_meta",
    "read_rank_file",
    "scale_methods",
    "write_coverage",
    "write_meta",
    "write_rank_file",
]
