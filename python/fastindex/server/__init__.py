"""Serve a store over HTTP: a JSON API, live progress (WebSocket, Server-Sent Events,
polling) and a web page that fills as samples arrive. Needs `pip install 'fastindex[server]'`.

```python
from fastindex.server import start_server
with start_server("fastindex.db", port=0, allowed_roots=["photos"]) as server:
    print(server.url)  # `POST /api/datasets` may index folders under photos/ only
```
"""

from __future__ import annotations

from ..extras import require

# Without fastapi and uvicorn, say which extra to install rather than which module is missing.
require("server")

from .app import create_app  # noqa: E402
from .errors import ForbiddenError, NotFoundError, NotReadyError, status_of  # noqa: E402
from .run import ServerHandle, run_server, start_server  # noqa: E402

__all__ = [
    "ForbiddenError",
    "NotFoundError",
    "NotReadyError",
    "ServerHandle",
    "create_app",
    "run_server",
    "start_server",
    "status_of",
]
