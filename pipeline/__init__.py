"""Orchestration: configuration, planning, Ray execution, resume and the CLI."""
