"""What main.py drives a run with, above engine.py: the run's data loaders (``data.py``) and the
tail of an epoch -- evaluation, the evaluation extras (``extras/``), stop points (``tail.py``)."""
