"""What each command does, end to end, as library functions: `cli.py` parses options, calls one of these
and prints what it returns. Progress and messages reach the caller through callbacks."""
