"""Shared fixtures live in tests/fixtures/* (one module per real part)."""

pytest_plugins = ["tests.fixtures.nats", "tests.fixtures.docker", "tests.fixtures.engine"]
