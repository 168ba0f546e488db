"""The one base of every error weight-edit expects (bad input, unusable files, refused options): the CLI
turns any of them into one red line and exit code 2, with no traceback."""


class WeightEditError(ValueError):
    """An expected, explained failure; its message names the file, row, tensor or option at fault."""
