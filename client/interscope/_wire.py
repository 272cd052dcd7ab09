"""What the server and the SDK agree on beyond the .proto: names of gRPC metadata.

The server imports these from here (as it imports `interscope.codec`), so both sides spell a
key once.
"""

from __future__ import annotations

#: Trailing metadata on a RESOURCE_EXHAUSTED status: "later" when the server was busy (the call
#: limit, a full queue), "no" when the request itself is over a limit and would be refused
#: again. The SDK's audit retries only the first; any client may read it.
RETRY_METADATA = "interscope-retry"
