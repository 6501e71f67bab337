"""The one exception type users see: a one-line message naming the culprit and the fix.

`segjax.cli` prints these as `error: <message>` with no traceback and exits with status 2.
"""


class SegjaxError(ValueError):
    pass
