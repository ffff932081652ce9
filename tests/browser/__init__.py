"""Browser tests: the web page in the system's headless Chromium, driven by selenium. Marker
``browser``, set by tests/conftest.py. Without Chromium they skip, and fail under CI (CI set)."""
