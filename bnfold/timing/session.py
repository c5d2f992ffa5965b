"""Sessions and single runs for timing: the configuration's session, I/O binding, the provider probe.

Models are opened with :func:`bnfold.check.runtime.open_model` ``in_memory``: every model is handed to
onnxruntime as bytes (a path is read first, its folder given for external data), so that no model's
session creation time includes reading a file while the others' does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import onnxruntime as ort

from bnfold.check.runtime import ModelHandle, SessionError, create_session
from bnfold.errors import BadInputError
from bnfold.timing.providers import MeasureConfig, plan_configs

__all__ = [
    "BoundRunner",
    "HostRunner",
    "checked_session",
    "config_session",
    "make_runner",
    "probe_factory",
    "provider_options",
]

logger = logging.getLogger(__name__)


def provider_options(config: MeasureConfig) -> dict[str, str]:
    """Options of the configuration's provider: the device id on a GPU."""
    return {"device_id": str(config.device_id)} if config.device != "cpu" else {}


def config_session(model: ModelHandle, config: MeasureConfig, threads: int | None) -> ort.InferenceSession:
    """A session for ``config`` (raises SessionError)."""
    # spinning off: with two sessions alive, one's idle threads would busy-wait on the cores the other
    # is being timed on (measured here: a 13% false slowdown of identical graphs on 2 cores)
    return create_session(
        model, config.provider, level=config.level, threads=threads, provider_options=provider_options(config),
        spinning=False,
    )


def checked_session(model: ModelHandle, config: MeasureConfig, threads: int | None) -> ort.InferenceSession:
    """:func:`config_session`, with a refusal as BadInputError naming the model and configuration."""
    try:
        return config_session(model, config, threads)
    except SessionError as err:
        raise BadInputError(
            f"onnxruntime cannot create a session for model '{model.label}' ({config.label}): {err}"
        ) from None


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


def probe_factory(first: ModelHandle, threads: int | None, device_id: int) -> Callable[[str], str | None]:
    """A :data:`bnfold.check.runtime.ProviderProbe` that opens ``first`` on the provider (optimizations off)."""

    def probe(provider: str) -> str | None:
        config = plan_configs([provider], ["disable_all"], device_id=device_id)[0]
        try:
            config_session(first, config, threads)
        except SessionError as err:
            return str(err)
        return None

    return probe
