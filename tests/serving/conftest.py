"""The serving fixtures (real vLLM, gateway) live in tests/conftest.py, shared with the job tests."""
