"""Reference diagnostics (docs/design.md §9): recording of the encoder's sampling and guidance, D1-D6 metrics."""
from .reference_diagnostics import ReferenceDiagnostics

__all__ = ["ReferenceDiagnostics"]
