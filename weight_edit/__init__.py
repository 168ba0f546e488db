"""weight-edit: find the refusal direction of a chat model and remove it from the weights."""

__version__ = "0.1.0"
