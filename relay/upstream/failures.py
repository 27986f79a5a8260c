"""What a failed upstream exchange means for the call: requests' exceptions, mapped in one place.

    requests' exception        while sending (no reply yet)       in a reply's body
    ConnectTimeout             504 upstream_timeout; the key      -
                               rests; next target
    ConnectionError (refused,  502 upstream_error; the key rests; -
      unreachable, TLS, a      next target, even the same key
      dead pooled connection)  once more (nothing was answered)
    ReadTimeout                504 upstream_timeout, not retried  504 upstream_timeout;
                               (the upstream may be running it)   stream: upstream_timeout
    InvalidHeader              400 invalid_request                -
    ChunkedEncodingError,      502 upstream_error (as refused)    502 upstream_error;
      ContentDecodingError,                                       stream: upstream_dropped
      anything else

adapter.py turns urllib3's errors into these. The usage row's outcome is the error's code,
or for a stream already passed on, upstream_timeout / upstream_dropped (its final event).
"""

from dataclasses import dataclass
from typing import Literal

from requests.exceptions import ConnectTimeout, InvalidHeader, ReadTimeout

from relay.call import Outcome, as_outcome
from relay.errors import InvalidRequest, RelayError, UpstreamError, UpstreamTimeout

# Where the exchange broke: before the reply's status line, in a whole reply's body,
# or in a stream already passed on to the client.
Stage = Literal["send", "body", "stream"]


@dataclass(frozen=True)
class Failure:
    """One failed exchange: what the client hears and what forwarding does next."""

    error: RelayError  # the error reply, or the message of a stream's final error event
    outcome: Outcome  # the usage row's outcome
    retry: bool = False  # another target may answer: try the next one
    broken: bool = False  # no answer at all (a lone key gets one more try, on a new connection)
    rest: bool = False  # the key rests for RELAY_UPSTREAM_COOLDOWN


def classify(exc: OSError, stage: Stage, read_timeout: float) -> Failure:
    """The meaning of requests' exception `exc` (or a bare OSError) at `stage`."""
    if stage == "send":
        if isinstance(exc, ConnectTimeout):
            error: RelayError = UpstreamTimeout("The upstream did not accept a connection in time.")
            return Failure(error, as_outcome(error.code), retry=True, rest=True)
        if isinstance(exc, ReadTimeout):
            # The upstream took the request and went quiet: retrying could run it twice.
            error = UpstreamTimeout(
                f"The upstream did not answer within {read_timeout:g} s "
                "(RELAY_UPSTREAM_READ_TIMEOUT)."
            )
            return Failure(error, as_outcome(error.code))
        if isinstance(exc, InvalidHeader):
            # A client header requests will not send as it is; no upstream would take it.
            error = InvalidRequest("A request header has a value that cannot be forwarded.")
            return Failure(error, as_outcome(error.code))
        error = UpstreamError("The upstream could not be reached.")
        return Failure(error, as_outcome(error.code), retry=True, broken=True, rest=True)
    timed_out = isinstance(exc, ReadTimeout | TimeoutError)
    if stage == "stream":
        if timed_out:
            message = f"The upstream sent nothing for {read_timeout:g} s; the stream was ended."
            return Failure(UpstreamTimeout(message), "upstream_timeout")
        message = "The upstream connection broke in the middle of the stream."
        return Failure(UpstreamError(message), "upstream_dropped")
    if timed_out:
        error = UpstreamTimeout("The upstream went silent in the middle of its reply.")
    else:
        error = UpstreamError("The upstream broke off its reply.")
    return Failure(error, as_outcome(error.code))
