"""`ray-calib measure`: observers in vLLM workers, chunked runs with checkpoints, gather to the head.

observers   maxabs observers installed on the model inside each rank (worker side)
extension   the vLLM worker extension the head drives with collective_rpc
chunks      atomic per-chunk checkpoints and --resume
preflight   model dir, TP, blocklist, cluster checks before anything starts
plan        every decision of a run before it starts (device, backend, EP, engine, nodes); --dry-run
run         the stages of one measurement (library entry point `run_measure`)
gaudi       the INC backend: INC's own MEASURE in every rank (Gaudi)
inc_cpu     vLLM plugin running INC in vLLM's CPU workers (tests of the INC backend without Gaudi)
moe         one fused MoE layer's statistics: per-expert children and token counts
quantizable  does the run hold every range `quantize` will need (before writing)
stats       the running max |x| per tensor slot that observers keep
"""
