"""Core CLI commands (``medvision data``, ``medvision deid``), registered through entry points."""
