"""What the SDK clients share: failing with a message, and a nonce per prompt."""

import sys
import uuid


def check(cond, what):
    """Exits non-zero saying `what` unless `cond` holds."""
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def nonce():
    """A short random token, so each prompt (and its answer) is told apart."""
    return uuid.uuid4().hex[:10]
