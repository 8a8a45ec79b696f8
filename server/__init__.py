"""Coordinator: ServerApp, study workflow, aggregation, report (filled by later issues)."""
