"""Every error a user can cause, each with the fix in its message.

    RayCalibError                 base; `cli` prints `str(err)` on one line and exits with `exit_code`
    ├── MeasurementError          an INC measurement/scale file or set is wrong (names the file or rank)
    ├── UnifyError                a unify/expand request that cannot be met (names the sizes)
    ├── ConfigError               a QUANT_CONFIG, devices.conf or CLI value is wrong (names file/key/line)
    ├── ModelError                a model directory or checkpoint is unusable (names the path)
    ├── DataError                 a calibration dataset is unusable (names the file and field)
    ├── ClusterError              a host, node or Ray cluster problem (names the host)
    ├── EngineError               vLLM could not run the request
    ├── HubError                  the Hugging Face hub refused or could not be reached
    ├── DiskFullError             a write ran out of space (names the file and the bytes still needed)
    └── OutputExistsError         --out already holds something else (use --force)

The CLI shows a traceback only with RAY_CALIB_DEBUG=1: a user mistake is never a traceback.
"""

from __future__ import annotations


class RayCalibError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message}; {fix}" if fix else message)

    def __reduce__(self):
        # Subclasses take extra constructor fields; rebuild from state so errors cross process pools.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type[RayCalibError], args: tuple, state: dict) -> RayCalibError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class MeasurementError(RayCalibError):
    def __init__(self, path: object, message: str, *, fix: str | None = None) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}", fix=fix)


class UnifyError(RayCalibError):
    exit_code = 2


class ConfigError(RayCalibError):
    exit_code = 2


class ModelError(RayCalibError):
    pass


class DataError(RayCalibError):
    pass


class ClusterError(RayCalibError):
    def __init__(self, host: str, message: str, *, fix: str | None = None) -> None:
        self.host, self.detail = host, message  # `detail`: the message without the host prefix
        super().__init__(f"{host}: {message}", fix=fix)


class EngineError(RayCalibError):
    pass


class HubError(RayCalibError):
    pass


class DiskFullError(RayCalibError):
    def __init__(self, path: object, needed: int, free: int | None, *, fix: str | None = None) -> None:
        self.path, self.needed, self.free = str(path), needed, free
        free_text = "" if free is None else f", {size_text(free)} free there"
        super().__init__(
            f"{self.path}: no space left on device ({size_text(needed)} more needed to finish it{free_text})",
            fix=fix or "free that much on its disk or choose another --out; the partial file was removed.",
        )


def size_text(size: int) -> str:
    """Bytes as a person reads them: GB from 0.1 GB up, else MB."""
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


class OutputExistsError(RayCalibError):
    exit_code = 3
