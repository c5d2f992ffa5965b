"""onnxruntime sessions and single runs for timing: model bytes, session options, providers, I/O binding.

Every model is handed to onnxruntime as bytes (a path is read first, with its folder given for external
data), so that no model's session creation time includes reading a file and the others' does not.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bnfold.errors import BadInputError, BnfoldError
from bnfold.onnx_io import load_model
from bnfold.timing.inputs import InputSpec, model_inputs
from bnfold.timing.providers import CPU, LEVELS, MeasureConfig, plan_configs

__all__ = [
    "BoundRunner",
    "HostRunner",
    "Loaded",
    "ModelSource",
    "checked_session",
    "create_session",
    "first_line",
    "make_runner",
    "probe_factory",
    "provider_list",
    "session_options",
]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto

_EXTERNAL_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class Loaded:
    """A model ready for onnxruntime: serialized bytes, plus the folder its external data lives in."""

    __slots__ = ("data", "folder", "label", "specs")

    def __init__(self, label: str, source: ModelSource) -> None:
        self.label = label
        self.folder: str | None = None
        if isinstance(source, onnx.ModelProto):
            try:
                self.data = source.SerializeToString()
            except ValueError as err:
                raise BadInputError(
                    f"model '{label}' cannot be serialized in memory ({err}); pass it as a file path"
                ) from err
        elif isinstance(source, bytes | bytearray | memoryview):
            self.data = bytes(source)
        else:
            path = Path(source)
            try:
                # Bytes for every model, so that no model's creation time includes reading a file.
                self.data = path.read_bytes()
            except OSError as err:
                raise BadInputError(f"cannot read model '{label}' from {path}: {err.strerror or err}") from err
            self.folder = str(path.resolve().parent)
        try:
            proto = source if isinstance(source, onnx.ModelProto) else load_model(self.data)
        except BadInputError as err:
            raise BadInputError(f"model '{label}': {err}") from err
        self.specs: tuple[InputSpec, ...] = model_inputs(proto)


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def session_options(level: str, threads: int | None, folder: str | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: onnxruntime logs to stderr itself, and a library is quiet
    if threads is not None:
        options.intra_op_num_threads = threads
    if folder is not None:
        options.add_session_config_entry(_EXTERNAL_DATA_FOLDER_KEY, folder)
    return options


def provider_list(config: MeasureConfig) -> list[str | tuple[str, dict[str, str]]]:
    if config.provider == CPU:
        return [CPU]
    options = {"device_id": str(config.device_id)} if config.device != "cpu" else {}
    return [(config.provider, options), CPU]


def create_session(model: Loaded, config: MeasureConfig, threads: int | None) -> ort.InferenceSession:
    options = session_options(config.level, threads, model.folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime warns (and falls back) for unavailable providers
        return ort.InferenceSession(model.data, sess_options=options, providers=provider_list(config))


def checked_session(model: Loaded, config: MeasureConfig, threads: int | None) -> ort.InferenceSession:
    try:
        return create_session(model, config, threads)
    except BnfoldError:
        raise
    except Exception as err:
        raise BadInputError(
            f"onnxruntime cannot create a session for model '{model.label}' ({config.label}): {first_line(err)}"
        ) from err


class BoundRunner:
    """One run with inputs and outputs bound (I/O binding) on the configuration's device."""

    __slots__ = ("_binding", "_run", "_sync", "_values")

    def __init__(self, session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], config: MeasureConfig):
        self._binding = session.io_binding()
        self._values = []  # keep the device copies alive for as long as the binding uses them
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(array, config.device, config.device_id)
            self._binding.bind_ortvalue_input(name, value)
            self._values.append(value)
        for out in session.get_outputs():
            self._binding.bind_output(out.name, config.device, config.device_id)
        self._run = session.run_with_iobinding
        self._sync = self._binding.synchronize_outputs if config.device != "cpu" else None

    def __call__(self) -> None:
        self._run(self._binding)
        if self._sync is not None:
            self._sync()


class HostRunner:
    """One ``session.run`` with numpy inputs and outputs (on a GPU provider: includes the copies)."""

    __slots__ = ("_feeds", "_names", "_run")

    def __init__(self, session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]):
        self._run = session.run
        self._names = [o.name for o in session.get_outputs()]
        self._feeds = dict(feeds)

    def __call__(self) -> None:
        self._run(self._names, self._feeds)


def make_runner(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], config: MeasureConfig
) -> Callable[[], None]:
    if config.io == "bound":
        return BoundRunner(session, feeds, config)
    return HostRunner(session, feeds)


def probe_factory(first: Loaded, threads: int | None, device_id: int) -> Callable[[str], str | None]:
    def probe(provider: str) -> str | None:
        config = plan_configs([provider], ["disable_all"], device_id=device_id)[0]
        try:
            session = create_session(first, config, threads)
        except Exception as err:
            return first_line(err)
        used = session.get_providers()
        if not used or used[0] != provider:
            return f"the session fell back to {used[0] if used else 'nothing'}"
        return None

    return probe
