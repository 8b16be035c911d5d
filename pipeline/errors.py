"""What the command line shares with every module: the one exception users see as a one-line
message (exit code 2), and how a head trained beside others names its log lines.

This module sits below the ground floor: every module may import it, it imports nothing.
"""

# A head trained beside others (``training.run_heads``) runs in a thread named LANE + its
# label; the command line puts that label before each of its log lines.
LANE = "lane:"


class PipelineError(Exception):
    """Bad input or environment: the message names the input and what to do."""
