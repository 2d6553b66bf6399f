"""Calibration datasets -> prompts (token ids and text), with a report of what was kept and why."""
