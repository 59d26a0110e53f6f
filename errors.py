"""The one kind of error a user of these scripts sees: bad input, reported by cli.run as one line on stderr with
exit code 2 and no traceback. Every module raises it (cli.UserError is this class), and the lowest ones, which
cli itself uses, import it from here."""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""
