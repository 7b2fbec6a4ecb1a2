"""What the parity suites raise when only the gateway failed.

A known gateway fault is marked as a strict xfail with ``raises=GatewayOnlyFailure``: it only counts as expected when the command
worked directly on Kubo and failed through the gateway. Once the gateway is fixed the test
passes, and the strict xfail turns that into a failure telling to remove the mark.
"""

class GatewayOnlyFailure(AssertionError):
    """The operation worked on Kubo directly and failed through the gateway."""
