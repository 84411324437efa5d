"""Prefect tasks: the units of work Prefect tracks and shows (restore, train an epoch, save, resume steps).

Tasks call into the core package `resumable`; they never hold tensor code of their own.
"""
