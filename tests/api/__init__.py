"""API tests: a real uvicorn server in a thread on 127.0.0.1 (tests/support/server.py's
``running_server``), talked to with httpx and the openai and anthropic clients. Marker ``api``,
set by tests/conftest.py."""
