"""`ray-calib measure`: observers in vLLM workers, chunked runs with checkpoints, gather to the head.

    observers   maxabs observers installed on the model inside each rank (worker side)
    extension   the vLLM worker extension the head drives with collective_rpc
    chunks      atomic per-chunk checkpoints and --resume
    preflight   model dir, TP, blocklist, cluster checks before anything starts
    run         the stages of one measurement (library entry point `run_measure`)
    gaudi       the INC-native path on Gaudi
    progress    the rich progress bar
    commands    the click command
"""
