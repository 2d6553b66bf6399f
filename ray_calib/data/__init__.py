"""Calibration datasets -> prompts (token ids and text), with a report of what was kept and why.

    formats       the formats (pile, mlcommons, tc) and their field names
    safe_pickle   allow-list unpickler for MLCommons DataFrame pickles
    readers       file -> raw rows, one reader per format
    prompts       rows -> CalibrationSet (shuffle, chat template, least_tokens, num_samples, hash); the
                  prompts after those as a validation split
    texts         real English passages on every machine (pydoc, licences, Debian docs), split into
                  calibration and held-out halves by document

Use: `load_prompts(path, tokenizer, fmt=None, num_samples=512, least_tokens=None) -> CalibrationSet`.
"""

from ray_calib.data.formats import FORMATS
from ray_calib.data.prompts import CalibrationSet, DataReport, Prompt, load_prompts, validation_prompts

__all__ = ["FORMATS", "CalibrationSet", "DataReport", "Prompt", "load_prompts", "validation_prompts"]
