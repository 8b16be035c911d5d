"""The one exception users see as a one-line message (exit code 2).

This module sits below the ground floor: every module may import it, it imports nothing.
"""


class PipelineError(Exception):
    """Bad input or environment: the message names the input and what to do."""
