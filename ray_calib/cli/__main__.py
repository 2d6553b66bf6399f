"""`python -m ray_calib.cli`: the same as the `ray-calib` script."""

from ray_calib.cli import main

main()
