"""The REST API of popek: ``popek serve`` (FastAPI over uvicorn).

A front end beside :mod:`popek.cli`: it parses a request, hands it to the
same core the CLI calls (typed requests through :meth:`popek.core.service.Core.handle`,
so both leave the same audit records) and returns the same records the CLI's
``--format json`` prints.  Nothing here is imported by the CLI's fast path:
``popek serve`` starts ``python -m popek.api`` (see :mod:`popek.api.server`).

- :mod:`popek.api.app`: ``create_app()``, the one place that registers routers;
- :mod:`popek.api.errors`: PopekError -> HTTP status and ``{"error": ...}`` body;
- :mod:`popek.api.auth`: who is asking (the local socket is root; TCP needs a token);
- :mod:`popek.api.runner`: operations in worker threads, recorded in the store;
- one router per resource: instances, images, networks, trust (keys, policy,
  audit), profiles, operations, events, and sessions (the console and an
  interactive exec over websockets).
"""
