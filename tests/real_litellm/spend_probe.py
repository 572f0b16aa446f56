"""A LiteLLM logger for the LiteLLM suite: writes, per call, the row LiteLLM's spend log would store.

The suite runs LiteLLM's proxy without a database (Prisma would fetch its engines from the
network), so it checks the row LiteLLM builds for the spend log (``get_logging_payload``, what its
database writer stores) rather than the database itself. One JSON line per call to ``$WATTGATE_SPEND_PROBE``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy.spend_tracking.spend_tracking_utils import get_logging_payload


class SpendProbe(CustomLogger):
    async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        row = get_logging_payload(kwargs, response_obj, start_time, end_time)
        metadata = row.get("metadata")
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        with open(os.environ["WATTGATE_SPEND_PROBE"], "a") as out:  # noqa: ASYNC230 - a test probe, one line
            out.write(json.dumps({"model": row.get("model_group"), "metadata": metadata}, default=str) + "\n")


probe = SpendProbe()
