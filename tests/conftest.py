"""Test tiers: unit/ (no services), integration/ (real Redis, S3 server, HTTP receiver),
e2e/ (real worker processes through the CLI). Services start on free loopback ports."""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.diffusion_models",
]
