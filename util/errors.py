"""The exception for bad input from the user: main.py prints its message as one line and exits 2."""


class InputError(ValueError):
    """A configuration, data file, checkpoint or output directory that cannot be used as given.

    The message names the problem (file, image or annotation id, flag) and fits on one line.
    """
