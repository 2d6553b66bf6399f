"""Unpickling MLCommons-style DataFrame pickles without running code from the file.

A pickle may name any importable callable and call it while loading, so `pd.read_pickle` on a file
from the internet is code execution. This unpickler resolves only the classes and functions a plain
DataFrame needs (pandas 1.x-3.x internals, numpy arrays, pyarrow-backed strings) and refuses the rest,
then checks that the result is a DataFrame whose cells are plain values.
"""

from __future__ import annotations

import io
import numbers
import pickle
from pathlib import Path
from typing import Any

from ray_calib.errors import DataError

_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        # pandas containers and their reconstruction helpers
        ("pandas", "DataFrame"),
        ("pandas.core.frame", "DataFrame"),
        ("pandas", "Index"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas", "RangeIndex"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas.core.internals.blocks", "new_block"),
        ("pandas.core.internals.blocks", "ObjectBlock"),
        ("pandas.core.internals.blocks", "FloatBlock"),
        ("pandas.core.internals.blocks", "IntBlock"),
        ("pandas.core.internals.blocks", "BoolBlock"),
        ("pandas.core.internals.blocks", "NumpyBlock"),
        ("pandas", "StringDtype"),
        ("pandas.core.arrays.string_", "StringDtype"),
        ("pandas.core.arrays.string_", "StringArray"),
        ("pandas.arrays", "StringArray"),
        ("pandas.arrays", "ArrowStringArray"),
        ("pandas.core.arrays.string_arrow", "ArrowStringArray"),
        # numpy arrays (plain dtypes; object arrays can only hold what this list allows)
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        # pyarrow buffers behind pandas 3 string columns: data only
        ("pyarrow.lib", "_restore_array"),
        ("pyarrow.lib", "type_for_alias"),
        ("pyarrow.lib", "py_buffer"),
        # builtins the above use for slices and raw bytes
        ("builtins", "slice"),
        ("builtins", "bytearray"),
        ("__builtin__", "slice"),
        ("__builtin__", "bytearray"),
        ("_codecs", "encode"),
    }
)
_FIX = "re-save it as a plain DataFrame (df.to_pickle) or convert it to JSONL/Parquet with the same columns."


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"{self.path}: refusing to unpickle '{module}.{name}' (only plain pandas "
                "DataFrames are allowed: a pickle can run code when loaded)",
                fix=_FIX,
            )
        return super().find_class(module, name)


def load_dataframe(path: Path):
    """Load the DataFrame in `path` through the allow-list; anything else raises `DataError`."""
    import pandas as pd

    try:
        obj = _AllowListUnpickler(path.read_bytes(), path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err})", fix=_FIX) from None
    if not isinstance(obj, pd.DataFrame):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a pandas DataFrame", fix=_FIX)
    _check_plain(obj, path)
    return obj


def _check_plain(frame, path: Path) -> None:
    """Object columns may hold only str/number/bool/None: no lists, dicts or other objects."""
    for column in frame.columns:
        if frame[column].dtype != object:
            continue
        for row, value in enumerate(frame[column]):
            if not (value is None or isinstance(value, (str, numbers.Number))):
                raise DataError(
                    f"{path}: column '{column}' row {row} holds a {type(value).__name__}, not a plain value", fix=_FIX
                )
