"""The one exception type that means "the user's input is wrong", not "the code is wrong"."""


class UserInputError(ValueError):
    """Bad input from the user: a missing dataset, a wrong layout, a corrupt file.

    The command-line tools print its message as a single line and exit with status 2.
    """
