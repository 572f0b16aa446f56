"""The words a measurement is labelled with, each set defined once.

String enums: members are the strings they stand for (``Status.OK == "ok"``), so
they go into JSON, SQLite and Prometheus labels as they are, and the gateway's
metric label sets are derived from them.
"""

from __future__ import annotations

from enum import StrEnum


class Method(StrEnum):
    """How a figure was obtained."""

    NVML = "nvml"  # measured on the GPU
    ESTIMATE = "estimate"  # no meter could see the request: EcoLogits' model
    SIMULATED = "simulated"  # the simulated GPU (demo, tests)
    TRACE = "trace"  # a scripted trace (tests and benchmarks only)

    @classmethod
    def published(cls) -> tuple[Method, ...]:
        """The methods metrics and reports are labelled with (a trace's figures count as simulated)."""
        return cls.NVML, cls.ESTIMATE, cls.SIMULATED


class Status(StrEnum):
    """How a request's window ended."""

    OK = "ok"
    ERROR = "error"  # the upstream failed or answered with an error
    CLIENT_CLOSED = "client_closed"  # the client left before the answer was complete


class Fault(StrEnum):
    """Why a request's figure is an estimate though its GPU is metered, and what the meter counts as errors."""

    READ = "read"  # a reading failed
    LOST_GPU = "lost_gpu"  # the source no longer sees the GPU
    STALE = "stale"  # no fresh reading for ``stale_after_s``
    COUNTER_RESET = "counter_reset"  # the energy counter went backwards (made continuous)
    SAMPLER_DEAD = "sampler_dead"  # the sampler thread stopped
    UNMETERED_GPU = "unmetered_gpu"  # a GPU the meter was not started with
    INTERNAL = "internal"  # a bug in the meter, caught
    INIT = "init"  # the source could not start (no NVML, GPU not visible)
    UNREACHABLE = "unreachable"  # the meter runs in another process that did not answer (a gateway's hub)
    UNMEASURABLE = "unmeasurable"  # a GPU NVML cannot meter per request (MIG): a property, not an error

    @classmethod
    def errors(cls) -> tuple[Fault, ...]:
        """The kinds counted as meter errors."""
        return tuple(k for k in cls if k is not cls.UNMEASURABLE)
