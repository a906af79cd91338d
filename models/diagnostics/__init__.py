"""Reference diagnostics (docs/design.md §9): D1-D6 of a forward pass recorded by ``models.recording``."""
from .reference_diagnostics import ReferenceDiagnostics

__all__ = ["ReferenceDiagnostics"]
