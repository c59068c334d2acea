"""Prefect tasks: every piece of I/O (files, Zarr, environment) lives here."""
