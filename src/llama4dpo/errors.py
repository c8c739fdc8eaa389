"""One exception type for a user's mistake: the CLI prints it as a single line, never a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, paths, checkpoints). Printed as `error: <message>`.

    The message is always one line: whitespace runs (newlines in a user's key, field name or path
    included) are collapsed to single spaces.
    """

    def __init__(self, message: object = ""):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """An unknown config key or an impossible value. The message names the key."""
