"""The one error type for user mistakes, and the guard that turns it into one line and exit 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix (bad path, bad layout, corrupt image, missing artifact, ...).

    The message is one line that says what is wrong and what to do; it is printed without a
    traceback and the process exits with code 2.
    """


def exit_on_user_error(main: F) -> F:
    """Decorate a CLI entry point: a UserError prints `error: <message>` on stderr and exits 2."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
