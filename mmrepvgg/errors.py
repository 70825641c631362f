"""What the package raises when it cannot do what was asked. Every message says what was
wrong and what is allowed or what to do next. Nothing in the package exits: the command
lines in tools/ turn these errors into their one-line message on stderr and exit status 1
(``run_command``), so a script or notebook that calls the package gets an exception."""
import sys
from typing import Any, Callable, NoReturn

__all__ = ['MMRepVGGError', 'UsageError', 'InputError', 'MachineError', 'run_command']


class MMRepVGGError(Exception):
    """A request mmrepvgg refuses or a run it cannot carry on; the message is for the user."""


class UsageError(MMRepVGGError, ValueError):
    """An argument, an option or a config value that is not allowed (or not with another)."""


class InputError(MMRepVGGError, ValueError):
    """A file given (config, checkpoint, exported model, data set) that is missing or that
    cannot be used for the request."""


class MachineError(MMRepVGGError, RuntimeError):
    """This machine cannot run the request as set up (a GPU torch cannot use, checks that
    failed before a long run)."""


def run_command(main: Callable[[], Any]) -> NoReturn:
    """What a tool's ``__main__`` runs: ``main()``, its integer result the exit status (0
    for anything else), and an :class:`MMRepVGGError` printed as its message alone, exit
    status 1."""
    try:
        result = main()
    except MMRepVGGError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
