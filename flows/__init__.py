"""Prefect flows: each reads like the DAG it runs, one call per stage."""
