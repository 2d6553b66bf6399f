"""Test and demo support: NOT used by any production command path.

    tiny         tiny random-weight models (DeepSeek-V3 MLA+MoE, Llama) and synthetic calibration sets
    localnodes   a local sshd and two "nodes" (127.0.0.3, 127.0.0.4) for `up`/`down` on one machine
    hub_standin  a local stand-in for the subset of the Hugging Face Hub API that push/pull use
    demo         `make demo`: the whole pipeline end to end on this machine
    commands     `ray-calib make-tiny-model` / `make-calib-set` (a trial run without downloading a model)

This package may import anything in ray_calib; no production module imports it (an import-linter
contract in pyproject.toml checks that). The CLI names the two commands above by string, like every
command, so they load only when asked for.
"""
