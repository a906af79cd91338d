"""The parts of scripts/summarize.py, one role each: ``runs`` reads output directories, ``statistics``
groups runs and computes means and spreads over seeds, ``tables`` writes the markdown, ``plots`` draws
AP and the reference diagnostics against epoch."""
