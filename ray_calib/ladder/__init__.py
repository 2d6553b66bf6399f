"""`ray-calib ladder`: short hardware rungs run on the user's cluster before the real job (see `ladder.run`).

run         run rungs in order, stop at the first failure, write the table
rungs       the rungs, in ladder order
nodes       rung a: every node has what the head has
inc_tp2     rung b: INC MEASURE in vLLM at TP 2, one rank file per rank
allreduce   rung c: one all-reduce across every node over its IFNAME
ray_engine  rung c, when the cluster is up: INC MEASURE at the full TP over Ray, rank files on the head
inc_ep      rung d: a tiny MoE at TP 2 with expert parallelism, per-expert files, EP in the meta
inc_quantize  rung e: rung b's files unified to one rank, loaded by INC QUANTIZE
inc_generate  INC QUANTIZE in vLLM on CPU for one generation (rung e where there is no Gaudi)
compressed  rung f: the compressed-tensors route loads and generates
"""
