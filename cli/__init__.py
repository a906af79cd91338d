"""The command-line layer: flags, YAML configs, variant presets and their validation (``cli.config``).

It sits above ``models/`` and ``datasets/``: it reads the rules they own (allowed values of the
research settings, the stage schedule, annotation-file paths) and nothing below imports it.
"""
