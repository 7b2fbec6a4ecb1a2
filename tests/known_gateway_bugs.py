"""Gateway faults the parity suites know today, as strict xfail reasons.

Each xfail carries ``raises=GatewayOnlyFailure``: it only counts as expected when the command
worked directly on Kubo and failed through the gateway. Once the gateway is fixed the test
passes, and the strict xfail turns that into a failure telling to remove the mark.
"""

GET_CUT_OFF = ("the gateway takes Kubo's X-Content-Length on `get` (the size of the content) as "
               "the length of the tar stream, which is longer, and aborts the response")
QUERY_DECODED_TWICE = ("the gateway forwards aiohttp's already percent-decoded query string as if "
                       "it were encoded, so a query value with a space reaches Kubo raw and Kubo "
                       "answers 400")


class GatewayOnlyFailure(AssertionError):
    """The operation worked on Kubo directly and failed through the gateway."""
