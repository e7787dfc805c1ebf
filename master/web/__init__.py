"""The HTTP API and dashboard, a process of its own (FastAPI on uvicorn): reads the store, sends CONTROL."""
