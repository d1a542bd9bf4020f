"""The peftfx error family. Every message says what was wrong, what was expected and what to try."""
from __future__ import annotations

__all__ = [
    "PeftfxError",
    "TraceError",
    "RuleError",
    "NoMatchError",
    "ConflictError",
    "SiteError",
    "CheckpointError",
    "PassError",
    "ExportError",
    "DetectorError",
]


class PeftfxError(Exception):
    """Base class of every error peftfx raises on purpose."""


class TraceError(PeftfxError):
    """The model could not be turned into a graph."""


class RuleError(PeftfxError, ValueError):
    """A rule or selector is malformed (bad field, unknown role, bad data form)."""


class NoMatchError(RuleError):
    """A rule matched no site of the model."""


class ConflictError(RuleError):
    """Two rules claim the same site and do not compose."""


class SiteError(PeftfxError):
    """A method was asked for a site whose structure it cannot take."""


class CheckpointError(PeftfxError):
    """An adapter checkpoint is missing, malformed, or does not fit the model."""


class PassError(PeftfxError):
    """A graph pass found its precondition or postcondition broken."""


class ExportError(PeftfxError):
    """ONNX export or its verification failed."""


class DetectorError(PeftfxError, ValueError):
    """A role detector is registered wrongly: a taken name, or an ``after`` that is unknown or circular."""
