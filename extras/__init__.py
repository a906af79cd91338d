"""Evaluation extras: work after every evaluation that training must not notice (see ``base.py``).

    reference_diagnostics.py   the diag / eval_diag records of D1-D6 (--diag_images)
    validation_pictures.py     pictures of fixed validation images to TensorBoard (--vis_images)

Adding an extra is one file here -- a subclass of ``EvalExtra`` with a builder that returns None
when its flag is off, decorated with ``@register`` -- and its one line below. The loop in
``base.py`` runs each on the main process with random generators and train/eval flags restored
and a stop point after it; util/logger learns its records' types from ``records``.
"""
from .base import (REGISTERED, EvalExtra, build_extras, register, run_after_evaluation, run_before_training,
                   tail_record_types)

# the registered extras, one line each: they run in this order after an evaluation
from . import reference_diagnostics  # noqa: E402,F401  (ReferenceDiagnosticsExtra)
from . import validation_pictures  # noqa: E402,F401  (ValidationPictures)

__all__ = ["REGISTERED", "EvalExtra", "build_extras", "register", "run_after_evaluation", "run_before_training",
           "tail_record_types"]
