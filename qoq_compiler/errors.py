"""The one exception type qoqc raises for bad input: its message is shown to the user as is."""


class QoqcError(Exception):
    """A problem with the user's input (model, target, artifact, prompt), stated in one line."""
