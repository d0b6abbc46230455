"""User-facing errors: one line that says what is wrong and what to do.

Library code raises :class:`FedloraError` for bad input (paths, files, configs); the CLI prints
its message as a single line and exits with status 2 instead of showing a traceback.
"""


class FedloraError(Exception):
    """A problem the user can fix; the message names the file/field and the fix."""


class ConfigError(FedloraError):
    """A configuration value is missing, malformed or out of range."""


class DataError(FedloraError):
    """A data file is missing or holds records that cannot be used."""


class ModelError(FedloraError):
    """A base model path is missing or is not a usable causal-LM folder."""


class WireError(FedloraError):
    """Something that came over the network is malformed, out of range or inconsistent.

    Every check on a message from another party raises a subclass of this error; a server drops
    the reply that caused it (and counts it), a node refuses the message. Nothing else may escape
    from code that parses network input.
    """


class FileFormatError(FedloraError):
    """A saved file (adapter, checkpoint, model weights) is truncated, corrupted or not the format
    its name says; the message names the file and how to get a good one."""
