"""Training, evaluation and generation subcommands (filled in by the training issue)."""


def add_commands(sub) -> None:
    pass
