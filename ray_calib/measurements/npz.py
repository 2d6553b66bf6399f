"""INC's NPZ container: one zip member `arr_0.npy`, a 0-d object array holding the stats dict.

Loading an object array means unpickling, and unpickling runs code. `load` therefore never calls
`np.load(allow_pickle=True)`: it reads the .npy header itself and unpickles the payload with an
Unpickler that resolves only the globals numpy needs to rebuild plain arrays (`ALLOWED_GLOBALS`).
Anything else (os.system, builtins.eval, ...) is refused before it can run.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

from ray_calib import atomic
from ray_calib.errors import MeasurementError

# (module, name) pairs an INC stats pickle may reference; numpy 1.x and 2.x spell the core module differently.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # numpy scalars pickled with protocol 2 carry latin-1 encoded bytes
    }
)
_MEMBER = "arr_0.npy"


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise MeasurementError(
                self._path,
                f"holds a pickled '{module}.{name}', which a stats file never needs; refused without loading",
                fix="regenerate the file with INC or ray-calib; do not load files of unknown origin.",
            )
        return super().find_class(module, name)


def load(path: str | Path) -> Any:
    """Return the object stored in an INC stats NPZ, leaves as nested lists of floats."""
    import numpy as np

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read(_MEMBER)
        stream = io.BytesIO(raw)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(stream)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as err:
        raise MeasurementError(path, f"is not a readable NPZ stats file ({err})", fix="re-copy or regenerate it.")
    if not dtype.hasobject:
        raise MeasurementError(path, f"holds a {dtype} array, not INC's object array", fix="regenerate it.")
    try:
        array = _AllowListUnpickler(raw[stream.tell():], path).load()
    except MeasurementError:
        raise
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise MeasurementError(path, f"has a corrupt pickle payload ({err})", fix="re-copy or regenerate it.")
    return _to_lists(array.item() if isinstance(array, np.ndarray) and array.shape == () else array)


def _to_lists(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {key: _to_lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_lists(item) for item in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def _leaf_array(leaf: Any) -> Any:
    import numpy as np

    return np.asarray(leaf, dtype=np.float32)


def _to_arrays(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats dict with list leaves -> the same dict with float32 array leaves, as INC stores it.

    A node is `{"inputs": [leaf, ...], "outputs": [leaf, ...], "params": {"weight": leaf}}`.
    """
    nodes = {}
    for name, node in stats["Nodes"].items():
        out = {}
        for field, value in node.items():
            if field == "params":
                out[field] = {key: _leaf_array(leaf) for key, leaf in value.items()}
            elif isinstance(value, list):
                out[field] = [_leaf_array(leaf) for leaf in value]
            else:
                out[field] = _leaf_array(value)
        nodes[name] = out
    return {**stats, "Nodes": nodes}


def dumps(obj: Any) -> bytes:
    """Serialize `obj` (list leaves) the way INC does: np.savez of a 0-d object array."""
    import numpy as np

    holder = np.empty((), dtype=object)
    holder[()] = _to_arrays(obj)
    buffer = io.BytesIO()
    np.savez(buffer, holder)
    return buffer.getvalue()


def save(path: str | Path, obj: Any) -> Path:
    return atomic.write_bytes(path, dumps(obj))
