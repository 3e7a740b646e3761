"""Mistakes ``mypy --strict`` must report: each line marked ``# error: <code>`` is one.

Never run, and left out of the project's own mypy run (pyproject's ``exclude``);
``tests/test_typing.py`` checks it alone and compares what mypy reports with these marks.
"""

from __future__ import annotations

import os

import httpx

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, check

# A wrong model id.
request = EditRequest(prompt="a robot", model="flux-2-por")  # error: arg-type

# A wrong provider id, alone, in a failover list, to check, and to the async client.
FluxClient("laozang")  # error: arg-type
FluxClient(providers=["laozhang", "apiy"])  # error: list-item
AsyncFluxClient("aimlapy")  # error: arg-type
check(EditRequest(prompt="a robot", model="flux-2-pro"), "aimlap")  # error: arg-type

# A provider id held in a plain str: it may be anything, so it is not taken as one (wrap a name
# read from configuration in ProviderName, or use FluxClient.from_env()).
configured: str = os.environ.get("PROVIDER", "laozhang")
FluxClient(configured)  # error: arg-type

# Arguments of the wrong type.
FluxClient("laozhang", timeout="30")  # error: arg-type
FluxClient("laozhang", max_retries="3")  # error: arg-type
FluxClient("laozhang", routing="fastest")  # error: arg-type
FluxClient("laozhang", http_client=httpx.AsyncClient())  # error: arg-type
FluxClient("laozhang").with_options(timeout="5")  # error: arg-type
FluxClient("laozhang").with_options(retries=2)  # error: call-arg
EditRequest(prompt="a robot", model="flux-2-pro", width="1024")  # error: arg-type
EditRequest(prompt="a robot", model="flux-2-pro", images=42)  # error: arg-type
