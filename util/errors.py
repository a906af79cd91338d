"""The exception for bad input from the user: main.py prints its message as one line and exits 2."""


class InputError(ValueError):
    """A configuration, data file, checkpoint or output directory that cannot be used as given.

    The message names the problem (file, image or annotation id, flag) and fits on one line.
    """


def one_line_message(exc: BaseException) -> str:
    """The exception's message on one line.

    An exception raised in a DataLoader worker is re-raised in the main process with the worker's
    whole traceback as its text ("Caught X in DataLoader worker process 0. Original Traceback ...");
    its last line is the original "module.X: message", which is what the user needs.
    """
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, sep, message = last.partition(": ")
        text = message if sep and " " not in name else last
    return " ".join(text.split("\n")).strip()
