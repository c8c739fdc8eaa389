"""One exception type for a user's mistake: the CLI prints it as a single line, never a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, paths, checkpoints). Printed as `error: <message>`."""


class ConfigError(UserError):
    """An unknown config key or an impossible value. The message names the key."""
