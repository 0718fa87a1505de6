"""Pipeline stages: a pure core per stage (callable without Prefect) and a thin Prefect task."""
